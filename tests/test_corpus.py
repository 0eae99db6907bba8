"""The corpus: a small one built from the fallback source (stdlib docstrings), tokenised with
the real model's tokenizer; document boundaries, deterministic held-out split, windows."""

from __future__ import annotations

import pytest

from backend import corpus

pytestmark = pytest.mark.model   # loads the real model


@pytest.fixture(scope="module")
def small(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("corpus")
    summary = corpus.build(["stdlib"], root=root, max_words=25_000)
    corpus.tokenize(model.info.model_id, root=root)
    return root, summary


def test_build_summary_and_documents(small):
    root, summary = small
    docs = corpus.documents(root=root)
    assert summary["sources"]["stdlib"]["words"] >= 25_000
    assert docs.num_rows == summary["documents"] > 20
    assert docs["doc_id"].to_pylist() == list(range(docs.num_rows))
    assert set(docs["split"].to_pylist()) == {"train", "heldout"}
    assert max(docs["n_words"].to_pylist()) <= corpus.MAX_WORDS * 1.2
    # The split is a function of (source, title): rebuilding gives the same one.
    assert corpus._split_of("stdlib", docs["title"][0].as_py()) == docs["split"][0].as_py()


def test_tokens_match_model_encode_and_keep_boundaries(small, model):
    root, _ = small
    docs = corpus.documents(root=root)
    toks = corpus.token_table(model.info.model_id, root=root)
    assert toks["doc_id"].to_pylist() == docs["doc_id"].to_pylist()
    for i in (0, 5, docs.num_rows - 1):
        ids = toks["ids"][i].as_py()
        assert ids == model.encode(docs["text"][i].as_py(), max_tokens=10**6)
        assert toks["n_tokens"][i].as_py() == len(ids)


def test_windows_never_cross_documents(small, model):
    root, _ = small
    toks = corpus.token_table(model.info.model_id, root=root, split="train")
    by_doc = dict(zip(toks["doc_id"].to_pylist(), toks["ids"].to_pylist()))
    wins = corpus.windows(model.info.model_id, "train", 64, root=root)
    covered: dict[int, int] = {}
    for doc, start, ids in wins:
        assert start % 64 == 0 and 2 <= len(ids) <= 64
        assert by_doc[doc][start:start + len(ids)] == ids
        covered[doc] = covered.get(doc, 0) + len(ids)
    assert all(covered[d] >= len(ids) - 1 for d, ids in by_doc.items())
    assert all(d in by_doc for d in covered)   # no held-out document leaks into train windows


def test_folder_source_and_info(tmp_path, model):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First paragraph of a user text, long enough to keep.\n\n" * 3)
    (folder / "sub" / "b.txt").write_text("Another document with several words in it, for the test.")
    out = tmp_path / "c"
    s = corpus.build([], root=out, folder=folder)
    assert s["sources"] == {"folder": {"documents": 2, "words": s["words"]}}
    corpus.tokenize(model.info.model_id, root=out)
    info = corpus.info(root=out)
    assert info["built"] and sum(info["tokens"][model.info.model_id].values()) > 20


def test_split_paragraphs_caps_length():
    text = "\n\n".join(" ".join(["word"] * 50) for _ in range(40)) + "\n\n" + " ".join(["x"] * 2000)
    pieces = corpus.split_paragraphs(text, max_words=300)
    assert all(len(p.split()) <= 300 for p in pieces)
    assert sum(len(p.split()) for p in pieces) == 40 * 50 + 2000


def test_unknown_source_is_a_typed_error(tmp_path):
    with pytest.raises(corpus.CorpusUnavailable):
        corpus.build(["no-such-source"], root=tmp_path)

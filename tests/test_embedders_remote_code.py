"""sentence-transformers models that ship their own modelling code (trust_remote_code), built offline in
tmp_path: a custom transformers model class (config auto_map) and a custom sentence-transformers module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_embedders import DOCS, unit

from phi3fast.cli import main
from phi3fast.errors import Phi3FastError
from phi3fast.rag import Index
from phi3fast.rag.embedders import bundled_model_path, load_embedder, shared_embedder

CUSTOM_CODE = '''
"""A BERT under another model_type: transformers can load it only by running this file."""
from transformers import BertConfig, BertModel


class TinyEncConfig(BertConfig):
    model_type = "phi3fast-tinyenc"


class TinyEncModel(BertModel):
    config_class = TinyEncConfig
'''


@pytest.fixture(scope="module")
def custom_code_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers folder whose config maps AutoConfig/AutoModel to a .py file in the folder (as
    jina-embeddings does), with the bundled MiniLM tokenizer and random weights."""
    import importlib.util

    d = tmp_path_factory.mktemp("custom") / "tinyenc-model"
    d.mkdir()
    (d / "tinyenc.py").write_text(CUSTOM_CODE)
    spec = importlib.util.spec_from_file_location("phi3fast_test_tinyenc", d / "tinyenc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.TinyEncConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    cfg.auto_map = {"AutoConfig": "tinyenc.TinyEncConfig", "AutoModel": "tinyenc.TinyEncModel"}
    mod.TinyEncModel(cfg).save_pretrained(d)
    src = Path(bundled_model_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    (d / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    assert json.loads((d / "config.json").read_text())["model_type"] == "phi3fast-tinyenc"
    return d


def test_custom_code_needs_trust_remote_code(custom_code_model: Path, tmp_path: Path) -> None:
    with pytest.raises(Phi3FastError, match=r"ships its own modelling code .*pass --trust-remote-code"):
        load_embedder(str(custom_code_model))
    with pytest.raises(Phi3FastError, match="pass --trust-remote-code"):
        shared_embedder(str(custom_code_model))
    emb = shared_embedder(str(custom_code_model), trust_remote_code=True)
    assert shared_embedder(str(custom_code_model), trust_remote_code=True) is emb
    assert type(emb.model[0].auto_model).__name__ == "TinyEncModel"  # the folder's own class ran
    assert (emb.dim, emb.max_seq_length, emb.trust_remote_code) == (32, 64, True)
    assert emb.info.name == str(custom_code_model.resolve())
    texts = ["pump oil grade", "relief valve at 12 bar", "x"]
    vecs = emb.encode(texts)
    assert vecs.shape == (3, 32) and vecs.dtype == np.float32
    # Oracle: the same custom model through transformers, mean-pooled by hand.
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(custom_code_model)
    model = AutoModel.from_pretrained(custom_code_model, trust_remote_code=True).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = unit(((h * mask).sum(1) / mask.sum(1)).numpy())
    np.testing.assert_allclose(vecs, want, rtol=0, atol=1e-5)
    # And it indexes and searches like any embedder; the index needs trust_remote_code to load it again.
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    kw = {"chunk_tokens": 48, "overlap": 8, "progress": False}
    with pytest.raises(Phi3FastError, match="pass --trust-remote-code"):
        Index.build([docs], tmp_path / "idx", embedder=str(custom_code_model), **kw)
    index = Index.build(
        [docs], tmp_path / "idx", embedder=str(custom_code_model), trust_remote_code=True, **kw
    )
    assert index.manifest["embedder"] == {
        "name": emb.name,
        "dim": 32,
        "max_seq_length": 64,
        "trust_remote_code": True,
    }
    assert len(index.search("relief valve", k=3, mode="dense")) == 3
    with pytest.raises(Phi3FastError, match="pass --trust-remote-code"):
        Index.open(tmp_path / "idx").search("relief valve", k=3, mode="dense")
    # The CLI's --trust-remote-code reaches it; without it, one line says to pass it.
    runner, out = CliRunner(), str(tmp_path / "cli-idx")
    cmd = [
        "index",
        str(docs),
        "--out",
        out,
        "--embedder",
        str(custom_code_model),
        "--chunk-tokens",
        "48",
        "--overlap",
        "8",
    ]
    r = runner.invoke(main, cmd)
    assert r.exit_code == 2 and "pass --trust-remote-code" in r.output
    r = runner.invoke(main, [*cmd, "--trust-remote-code"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["query", "relief valve", "--index", out, "--mode", "dense"])
    assert r.exit_code == 2 and "pass --trust-remote-code" in r.output
    r = runner.invoke(
        main, ["query", "relief valve", "--index", out, "--mode", "dense", "--trust-remote-code"]
    )
    assert r.exit_code == 0 and "[3] " in r.output, r.output
    with pytest.raises(Phi3FastError, match="cannot be searched with 'openai:tiny-embed'"):
        Index.open(tmp_path / "idx", embedder="openai:tiny-embed")
    reopened = Index.open(tmp_path / "idx", trust_remote_code=True)
    assert (
        reopened.search("relief valve", k=1, mode="dense")[0].text
        == index.search("relief valve", k=1, mode="dense")[0].text
    )


def test_custom_sentence_transformers_module(custom_code_model: Path, tmp_path: Path) -> None:
    """jina-embeddings-v3's way: modules.json names a module class in a .py file of the folder."""
    d = tmp_path / "custom-st"
    shutil.copytree(custom_code_model, d)
    (d / "custom_st.py").write_text(
        "from sentence_transformers.models import Transformer as _Transformer\n\n\n"
        "class Transformer(_Transformer):\n    pass\n"
    )
    modules = json.loads((d / "modules.json").read_text())
    modules[0]["type"] = "custom_st.Transformer"
    (d / "modules.json").write_text(json.dumps(modules))
    config = json.loads((d / "config.json").read_text())  # the same weights, as a plain BERT this time
    del config["auto_map"]
    config.update(model_type="bert", architectures=["BertModel"])
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(Phi3FastError, match="ships its own modelling code .*pass --trust-remote-code"):
        load_embedder(str(d))
    emb = load_embedder(str(d), trust_remote_code=True)
    assert type(emb.model[0]).__module__.endswith("custom_st")
    texts = ["pump oil grade", "relief valve at 12 bar"]
    ref = shared_embedder(str(custom_code_model), trust_remote_code=True)
    np.testing.assert_allclose(emb.encode(texts), ref.encode(texts), rtol=0, atol=1e-6)


def test_loading_an_embedder_draws_no_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    emb = load_embedder()  # a fresh load, not the shared instance
    assert emb.dim == 384
    assert "Loading weights" not in capsys.readouterr().err  # it would land in the middle of query output
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored

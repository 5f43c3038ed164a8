"""The model loaders' errors (``diffexit.app.models``): one :class:`LoadError` line that names the folder, what is
wrong and the fix; a folder without tokenizer files says so; a ``--model`` that is neither a folder nor an embedded
name fails at once, without a connection attempt, on every command that takes one."""

import socket

import pytest

from diffexit.app import generate_text, models
from diffexit.app.cli import main as cli
from diffexit.app.models import LoadError

EMBEDDED = "['charlm', 'charlm-block', 'gemma']"
HUB_ID = "someowner/no-such-model"


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory, tiny_text_model):
    """``{name: folder}``: tiny random text models in the embedded format and as a plain transformers Llama, each
    saved whole and saved without its tokenizer."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("text-folders")
    folders = {}
    for kind, cls in (("embedded", None), ("transformers", LlamaForCausalLM)):
        model, tok = tiny_text_model(cls=cls)
        model.save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
        model.save_pretrained(root / f"{kind}-no-tokenizer")
        folders[kind], folders[f"{kind}-no-tokenizer"] = root / kind, root / f"{kind}-no-tokenizer"
    return folders


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails at once and is recorded: the list of addresses tried."""
    tried = []

    def connect(self, address):
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return tried


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line or "cannot load" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# The tokenizer ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, missing", [("embedded", "no tokenizer.json"),
                                           ("transformers", "none of tokenizer.json, tokenizer_config.json")])
def test_a_model_folder_without_tokenizer_files_says_which_folder_and_files(kind, missing, text_folders, tmp_path,
                                                                          capsys):
    folder = text_folders[f"{kind}-no-tokenizer"]
    argv = ["--task", "pick", "--n", "1", "--model", str(folder), "--out", str(tmp_path / "out")]
    assert generate_text.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot load the text model from {folder}: it has no tokenizer ({missing}" in line
    assert "tokenizer.save_pretrained(" in line and "sentencepiece" not in line
    assert line.count("cannot load") == 1 and not (tmp_path / "out" / "job.json").exists()


def test_the_loaders_check_the_tokenizer_before_loading(text_folders, tmp_path):
    with pytest.raises(LoadError, match="no tokenizer.json"):
        models.load_text_model_or_embedded(text_folders["embedded-no-tokenizer"])
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"model_type": "diffusion_gemma"}')
    with pytest.raises(LoadError, match=f"cannot load the DiffusionGemma model from {gemma}: it has no tokenizer"):
        models.load_gemma_or_embedded(gemma)
    # Whole folders load.
    assert models.load_text_model_or_embedded(text_folders["embedded"])[1].mask_token_id is not None


# LoadError ----------------------------------------------------------------------------------------------------------

def test_every_loader_failure_is_one_load_error(text_folders, tmp_path):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / name).write_bytes((text_folders["embedded"] / name).read_bytes())
    (truncated / "model.safetensors").write_bytes((text_folders["embedded"] / "model.safetensors").read_bytes()[:100])
    (tmp_path / "a-file").write_text("x")
    cases = [
        (lambda: models.load_text_model_or_embedded(truncated), f"cannot load the text model from {truncated}: "),
        (lambda: models.load_text_model_or_embedded(tmp_path / "empty-missing"), "no such folder"),
        (lambda: models.load_dit_pipeline(tmp_path / "a-file"), "is a file, not a folder; pass a diffusers DiT"),
        (lambda: models.load_dit_backbone(tmp_path / "nope"), "no such folder"),
        (lambda: models.load_uem(tmp_path / "nope"), "does not exist"),
    ]
    for load, message in cases:
        with pytest.raises(LoadError) as raised:
            load()
        text = str(raised.value)
        assert message in text and "\n" not in text and text.count("cannot load") <= 1, text
    assert issubclass(LoadError, ValueError)  # callers that catch ValueError keep working


def test_a_broken_model_is_reported_once_by_generate_text(text_folders, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (broken / "tokenizer.json").write_bytes((text_folders["transformers"] / "tokenizer.json").read_bytes())
    argv = ["--task", "pick", "--n", "1", "--model", str(broken), "--out", str(tmp_path / "out")]
    assert generate_text.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"diffexit generate text: error: cannot load the text model from {broken}: ")
    assert line.count("cannot load") == 1


# Names that are neither folders nor embedded models ------------------------------------------------------------------

def test_resolve_lists_the_embedded_names_and_never_downloads(no_network):
    with pytest.raises(LoadError) as raised:
        models.resolve_text_model(HUB_ID, hub=True)
    text = str(raised.value)
    assert f"cannot load the text model {HUB_ID}: no such folder, not an embedded model, and not in the local " \
           f"Hugging Face cache (nothing is downloaded here); download it first (`hf download {HUB_ID}`)" in text
    assert EMBEDDED in text
    with pytest.raises(LoadError, match=f"no such folder, and not an embedded model; pass a model folder or one of "
                                        f"\\{EMBEDDED[:-1]}"):
        models.resolve_text_model(HUB_ID)
    assert models.resolve_text_model("charlm") == models.embedded_text_models()["charlm"]
    assert not no_network


def test_a_hub_id_in_the_local_cache_decodes_from_its_snapshot(text_folders, no_network, monkeypatch, tmp_path):
    import json
    import shutil

    import huggingface_hub.constants

    # The cache's layout: models--OWNER--NAME/refs/main names the snapshot folder that holds the files.
    repo = tmp_path / "hub" / "models--someowner--cached-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(text_folders["transformers"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.resolve_text_model("someowner/cached-model", hub=True) == snapshot
    out = tmp_path / "out"
    result, _ = generate_text.run(["--task", "pick", "--n", "1", "--model", "someowner/cached-model",
                                   "--gen-length", "8", "--steps", "2", "--out", str(out)])
    assert result.generated == 1
    assert json.loads((out / "job.json").read_text())["model"] == str(snapshot.resolve())
    assert not no_network


@pytest.mark.parametrize("argv, message", [
    (["generate", "text", "--task", "pick", "--n", "1", "--model", HUB_ID], EMBEDDED),
    (["bench", "text", "--quick", "--model", HUB_ID], EMBEDDED),
    (["bench", "gemma", "--quick", "--model", HUB_ID], EMBEDDED),
    (["calibrate", "sched", "--risk", "0.1", "--model", HUB_ID], EMBEDDED),
    (["generate", "images", "--per-class", "1", "--pipeline", HUB_ID], f"no such folder {HUB_ID}"),
    (["generate", "images", "--per-class", "1", "--method", "deediff", "--threshold", "0.5", "--uem", HUB_ID],
     "does not exist"),
    (["train", "uem", "--steps", "1", "--model", HUB_ID], f"no such folder {HUB_ID}"),
    (["demo", "--text-model", HUB_ID], f"--text-model {HUB_ID}: no config.json there"),
], ids=["generate text", "bench text", "bench gemma", "calibrate sched", "generate images --pipeline",
        "generate images --uem", "train uem", "demo"])
def test_an_unknown_model_name_fails_at_once_on_every_command(argv, message, no_network, tmp_path, capsys):
    if argv[0] != "demo":
        argv = [*argv, "--out", str(tmp_path / ("out.json" if argv[1] == "sched" else "out"))]
    try:
        code = cli(argv)
    except SystemExit as e:  # argparse's error, from the commands that report through their parser
        code = e.code
    assert code != 0
    line = _one_error_line(capsys.readouterr().err)
    assert message in line and HUB_ID in line
    assert not no_network, f"tried to connect to {no_network}"

"""Issue #30's newcomer finding on truncated text weights: a model folder whose ``model.safetensors`` was cut short
is refused in one line that says the weights file is unreadable and how to fix it, on the loader and on
``diffexit generate text``, for the embedded format and for a plain transformers model (safetensors' own message,
"incomplete metadata, file not fully covered", named neither)."""

import pytest

from diffexit.app import generate_text, models
from diffexit.app.models import LoadError

PROBLEM = "its weights file is unreadable (truncated, or not a safetensors file"
FIX = "copy or export the folder again, whole"


@pytest.fixture(scope="module")
def truncated_folders(tmp_path_factory, tiny_text_model):
    """``{kind: folder}``: a tiny random model saved whole with its tokenizer, then its weights cut to 100 bytes; kinds
    are the embedded format and a transformers Llama."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("truncated")
    folders = {}
    for kind, cls in (("embedded", None), ("transformers", LlamaForCausalLM)):
        model, tok = tiny_text_model(cls=cls)
        model.save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
        weights = root / kind / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        folders[kind] = root / kind
    return folders


def test_the_loader_names_the_unreadable_weights_and_the_fix(truncated_folders):
    folder = truncated_folders["embedded"]
    with pytest.raises(LoadError) as raised:
        models.load_text_model_or_embedded(folder)
    text = str(raised.value)
    assert text.startswith(f"cannot load the text model from {folder}: {PROBLEM}") and text.endswith(FIX), text
    assert "\n" not in text and text.count("cannot load") == 1


@pytest.mark.parametrize("kind", ["embedded", "transformers"])
def test_generate_text_refuses_truncated_weights_in_one_line(kind, truncated_folders, tmp_path, capsys):
    folder = truncated_folders[kind]
    out = tmp_path / "out"
    argv = ["--task", "pick", "--n", "1", "--model", str(folder), "--out", str(out)]
    assert generate_text.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line or "cannot load" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"diffexit generate text: error: cannot load the text model from {folder}: {PROBLEM}")
    assert lines[0].endswith(FIX)
    assert not (out / "job.json").exists()  # refused before the job is written

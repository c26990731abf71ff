"""`palm-serve serve` settings: every Settings field is a --flag and a PALM_* variable of
the same name, a flag wins over the environment; without a model it says so."""

from __future__ import annotations

import pytest

from palm_serve.server.cli import SETTINGS_FIELDS, build_parser, main
from palm_serve.server.settings import Settings


def settings_from(argv: list[str]) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    return Settings(**{k: v for k, v in vars(args).items() if k in SETTINGS_FIELDS})


def test_every_setting_is_a_flag_and_an_env_var(monkeypatch):
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text, name
        assert f"PALM_{name.upper()}" in help_text, name
    monkeypatch.setenv("PALM_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("PALM_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("PALM_KV_CACHE_MEMORY", "2GiB")
    monkeypatch.setenv("PALM_ENABLE_PREFIX_CACHING", "false")
    s = settings_from([])
    assert s.max_num_seqs == 7 and s.kv_cache_memory == 2 * 1024**3
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.enable_prefix_caching is False
    s = settings_from(["--max-num-seqs", "9", "--enable-prefix-caching", "--api-key", "sekret-key"])
    assert s.max_num_seqs == 9 and s.enable_prefix_caching is True  # the flag wins
    assert s.api_key.get_secret_value() == "sekret-key" and "sekret-key" not in repr(s)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/dir"], "is not a model directory"),
        (["--port", "http"], "--port"),
        (["--dtype", "float64"], "--dtype"),
        (["--kv-cache-dtype", "int8"], "--kv-cache-dtype"),
        (["--dtype", "bfloat16", "--kv-cache-dtype", "float16"], "kv_cache_dtype float16 needs"),
    ],
)
def test_bad_settings_exit_2_with_a_message(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from palm_serve.server import serve, settings

    # Settings resolves the default; serve names it in the message: both must see tmp_path.
    for module in (serve, settings):
        monkeypatch.setattr(module, "default_model_dir", lambda: tmp_path / "default")
    assert serve.serve({}) == 2
    assert "no default model is present" in capsys.readouterr().err


def test_readme_settings_table_lists_every_setting():
    from pathlib import Path

    from palm_serve.server.settings import Settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`PALM_{name.upper()}`" not in readme]
    assert not missing, f"README's settings table lacks {missing}"

"""The first hour on the build side: every mistake through the real entry points (`python -m export.build`,
`python -m export.tiny`, `python -m engine`) is one `error:` line on stderr that says what to do, exit 2,
no traceback (-v keeps it); a second export of unchanged inputs keeps every component, and a changed
input re-exports only what it affects; every --help documents each flag and shows examples."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
ALL_FLAGS = ("--weights", "--base", "--instantid", "--ip-adapter", "--face-models", "--random-init")


def _env(tmp: Path) -> dict:
    """No network and an empty hub cache: what a newcomer without the checkpoints has."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def mistakes(tiny_weights, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each mistake run once through its real entry point (all at once: they are start-up bound)."""
    tmp = tmp_path_factory.mktemp("first_hour")
    (tmp / "empty").mkdir()
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("no export here")
    garbage = tmp / "garbage_faces"
    garbage.mkdir()
    (garbage / "glintr100.onnx").write_bytes(b"this is not an ONNX file")
    evil = tmp / "ip-adapter_sdxl_vit-h.bin"  # tensors plus an object torch will not unpickle safely
    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": {},
                "args": argparse.Namespace(lr=1e-4)}, evil)
    weights, out = str(tiny_weights), str(tmp / "out")
    from engine.manifest import update_manifest

    (tmp / "tiny_build").mkdir()
    update_manifest(tmp / "tiny_build", "tiny", lambda manifest: None)  # an (empty) export of --model tiny
    export = [sys.executable, "-m", "export.build"]
    engine = [sys.executable, "-m", "engine"]
    cases = {
        "engines_without_export": export + ["--model", "tiny", "--stage", "engines", "--out", str(tmp / "missing")],
        "sdxl_without_weights": export + ["--model", "sdxl", "--stage", "onnx", "--out", out],
        "empty_weights": export + ["--model", "sdxl", "--weights", str(tmp / "empty"), "--stage", "onnx", "--out", out],
        "base_and_random_init": export + ["--model", "sdxl", "--pipeline", "ip-adapter", "--base", "someone/sdxl-finetune",
                                    "--random-init", "--stage", "onnx", "--out", out],
        "hub_base_offline": export + ["--model", "sdxl", "--pipeline", "ip-adapter", "--base",
                                      "someone/sdxl-finetune", "--stage", "onnx", "--out", out],
        "face_models_missing_folder": export + ["--model", "tiny", "--face-models", str(tmp / "nope"), "--out", out],
        "face_models_empty_folder": export + ["--model", "tiny", "--weights", weights, "--face-models",
                                              str(tmp / "empty"), "--components", "arcface", "--stage", "onnx",
                                              "--out", out],
        "face_models_wrong_file": export + ["--model", "tiny", "--weights", weights, "--face-models", str(garbage),
                                            "--components", "arcface", "--stage", "onnx", "--out", out],
        "unsafe_pickle": export + ["--model", "tiny", "--pipeline", "ip-adapter", "--ip-adapter", str(evil),
                                   "--weights", weights, "--stage", "onnx", "--out", out],
        "unsafe_pickle_verbose": export + ["--model", "tiny", "--pipeline", "ip-adapter", "--ip-adapter", str(evil),
                                           "--weights", weights, "--stage", "onnx", "--out", out, "-v"],
        "unknown_component": export + ["--model", "tiny", "--components", "unet", "--out", out],
        "unknown_pipeline": export + ["--model", "tiny", "--pipeline", "faceswap"],
        "lora_scale_not_a_number": export + ["--model", "tiny", "--lora", f"{evil}:strong", "--out", out],
        "out_is_a_file": export + ["--model", "tiny", "--out", str(evil)],
        "out_holds_another_model": export + ["--model", "tiny-sd15", "--out", str(tmp / "tiny_build")],
        "tiny_into_a_file": [sys.executable, "-m", "export.tiny", str(garbage / "glintr100.onnx")],
        "engine_missing_folder": engine + ["build", str(tmp / "missing")],
        "engine_not_a_build": engine + [str(tmp / "notes")],
        "refit_without_source": engine + ["refit", str(tmp / "notes"), "--component", "unet_instantid"],
        "refit_not_a_build": engine + ["refit", str(tmp / "notes"), "--component", "unet_instantid", "--from",
                                       str(tmp / "empty")],
    }
    env = _env(tmp)
    running = {name: subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, command in cases.items()}
    done = {}
    for name, process in running.items():
        out_text, err_text = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(cases[name], process.returncode, out_text, err_text)
    return done


HINTS = {  # case: what the one error line must say (the message's text)
    "engines_without_export": ["holds no export", "python -m export.build --model tiny --out"],
    "sdxl_without_weights": ["missing", "offline", *ALL_FLAGS, "unet", "glintr100.onnx", "scrfd_10g_bnkps.onnx"],
    "empty_weights": ["missing", *ALL_FLAGS, "empty/stable-diffusion-xl-base-1.0/unet", "empty/InstantID/ip-adapter.bin",
                      "empty/antelopev2/glintr100.onnx"],
    "base_and_random_init": ["--random-init exclude each other"],
    "hub_base_offline": ["someone/sdxl-finetune/unet", "offline", "--base"],
    "face_models_missing_folder": ["--face-models", "is not a folder", "antelopev2"],
    "face_models_empty_folder": ["glintr100.onnx", "not found", "--face-models"],
    "face_models_wrong_file": ["glintr100.onnx is not an ONNX model", "--face-models"],
    "unsafe_pickle": ["ip-adapter_sdxl_vit-h.bin", "argparse.Namespace", "refuses to unpickle safely",
                      "to-safetensors", ".safetensors"],
    "unknown_component": ["--components unet", "choose from", "unet_instantid", "vae_decoder"],
    "unknown_pipeline": ["--pipeline", "faceswap", "instantid", "ip-adapter-plus"],
    "lora_scale_not_a_number": ["scale 'strong' is not a number", "FILE:SCALE"],
    "out_is_a_file": ["--out", "is a file"],
    "out_holds_another_model": ["holds an export of --model tiny, not tiny-sd15", "another --out"],
    "tiny_into_a_file": ["is a file", "folder"],
    "engine_missing_folder": ["is not a folder", "python -m export.build"],
    "engine_not_a_build": ["holds no export", "python -m export.build"],
    "refit_without_source": ["--from", "--onnx", "required"],
    "refit_not_a_build": ["holds no export"],
}


@pytest.mark.parametrize("case", sorted(HINTS))
def test_a_mistake_is_one_error_line_that_says_what_to_do(mistakes, case):
    done = mistakes[case]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr[done.stderr.index("error:"):]
    for hint in HINTS[case]:
        assert hint in message, (hint, message)


def test_verbose_keeps_the_traceback(mistakes):
    done = mistakes["unsafe_pickle_verbose"]
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("error:") and "to-safetensors" in done.stderr


def test_missing_weights_are_named_before_any_work(mistakes):
    """Every missing entry on its own line, each with the flags that supply it; nothing else was printed."""
    done = mistakes["empty_weights"]
    listed = [line for line in done.stderr.splitlines() if line.startswith("  ") and "not found" in line]
    assert len(listed) >= 12 and all("pass --" in line for line in listed)
    assert done.stdout == "" and not done.stderr.startswith(("There are", "Loading"))


# -- a second export keeps what did not change ----------------------------------------------------------
COMPONENTS = ["text_encoder", "image_proj", "vae_decoder"]


def _kohya_text_lora(weights: Path, path: Path) -> Path:
    """A rank-2 kohya LoRA on the tiny first text encoder's layer 0 q_proj."""
    import json

    width = json.loads((weights / "stable-diffusion-xl-base-1.0" / "text_encoder" / "config.json").read_text())[
        "hidden_size"]
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    generator = torch.Generator().manual_seed(0)
    save_file({f"{key}.lora_down.weight": torch.randn(2, width, generator=generator) * 0.1,
               f"{key}.lora_up.weight": torch.randn(width, 2, generator=generator) * 0.1,
               f"{key}.alpha": torch.tensor(2.0)}, str(path))
    return path


def _export(capsys, weights: Path, out: Path, *extra: str) -> dict[str, str]:
    """Run export.build in-process; {component: its progress line's status}."""
    from export.build import main

    assert main(["--model", "tiny", "--pipeline", "ip-adapter", "--components", *COMPONENTS, "--stage", "onnx",
                 "--weights", str(weights), "--out", str(out), *extra]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    return {line.split()[1]: line.split(None, 2)[2] for line in lines}


def test_second_export_keeps_unchanged_components(tiny_weights, tmp_path, capsys):
    from engine.manifest import load_manifest

    out = tmp_path / "build"
    first = _export(capsys, tiny_weights, out)
    assert list(first) == COMPONENTS and all(s.startswith("exported (first export) in ") for s in first.values())
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "onnx").iterdir()}
    assert _export(capsys, tiny_weights, out) == dict.fromkeys(COMPONENTS, "unchanged, kept")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "onnx").iterdir()} == stamps
    inputs = load_manifest(out).components["text_encoder"].onnx.export_flags["made_from"]
    assert inputs["precision"] == "fp32" and any(name.endswith("model.safetensors") for name in inputs["files"])

    half = _export(capsys, tiny_weights, out, "--precision", "fp16")  # the VAE decoder stays fp32: kept
    assert half["vae_decoder"] == "unchanged, kept"
    assert all(half[name].startswith("exported (changed: precision 'fp32' -> 'fp16')") for name in COMPONENTS[:2])
    lora = _kohya_text_lora(tiny_weights, tmp_path / "style.safetensors")
    styled = _export(capsys, tiny_weights, out, "--precision", "fp16", "--lora", f"{lora}:0.5")
    assert styled["text_encoder"].startswith("exported (changed: loras") and \
        styled["image_proj"] == styled["vae_decoder"] == "unchanged, kept"
    assert (out / "onnx" / "vae_decoder.onnx").stat().st_mtime_ns == stamps["vae_decoder.onnx"]
    forced = _export(capsys, tiny_weights, out, "--precision", "fp16", "--lora", f"{lora}:0.5", "--force")
    assert all(status.startswith("exported (forced)") for status in forced.values())


# -- --help -------------------------------------------------------------------------------------------
def _parsers(monkeypatch, main, argv: list[str]) -> argparse.ArgumentParser:
    """The ArgumentParser `main(argv)` builds (captured at parse time)."""
    from export.cli import ArgumentParser

    seen = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main(argv)
    return seen[0]


@pytest.mark.parametrize("entry", ["export.build", "export.tiny", "engine", "engine refit", "engine fusion"])
def test_help_documents_every_flag_with_examples(entry, monkeypatch):
    from engine.__main__ import main as engine_main
    from export.build import main as export_main
    from export.tiny import main as tiny_main

    main, argv = {"export.build": (export_main, []), "export.tiny": (tiny_main, []), "engine": (engine_main, []),
                  "engine refit": (engine_main, ["refit"]), "engine fusion": (engine_main, ["fusion"])}[entry]
    parser = _parsers(monkeypatch, main, argv)
    undocumented = [action.option_strings or action.dest for action in parser._actions if not action.help]
    assert not undocumented
    assert "examples:" in parser.epilog and f"python -m {entry.split()[0]}" in parser.epilog
    text = parser.format_help()
    assert "examples:" in text and "\n  python -m" in text  # the epilog keeps its lines
    if entry == "export.build":
        assert "manifest, then (optionally) build the engines." in text  # the whole first sentence
        assert all(name in text for name in ("unet_ip_adapter_plus", "face_detector", "image_proj_plus"))
        assert "(default: all)" in text and "'stacked' (default" in text


def test_help_exits_zero():
    done = [subprocess.run([sys.executable, "-m", *entry.split(), "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120) for entry in ("export.build", "engine refit")]
    assert all(d.returncode == 0 and "examples:" in d.stdout and d.stderr == "" for d in done)


def test_the_command_line_answers_before_torch_loads():
    """Parsing, the --components / --pipeline checks and the missing-weights message need no torch,
    diffusers or ONNX tooling: a mistake is answered in a second."""
    code = ("import sys, export.build, engine.__main__; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'onnx', "
            "'onnx_ir', 'tensorrt_rtx', 'tensorrt'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr

"""`python -m runtime`: argument parsing and the errors that need no build (the full CLI runs in
tests/test_runtime_pipeline.py against the tiny build)."""
from __future__ import annotations

import pytest

from runtime.__main__ import _scale, main, parser


def test_generate_arguments():
    args = parser().parse_args(["generate", "--build", "b", "--face", "p.jpg", "--prompt", "x", "--out", "o.png",
                                "--pipeline", "ip-adapter-plus", "--ip-scale", "0.5,0.6", "--scheduler", "dpmpp_2m"])
    assert args.image == "p.jpg" and args.ip_scale == [0.5, 0.6] and args.scheduler == "dpmpp_2m"
    assert _scale("0.7") == 0.7
    with pytest.raises(SystemExit):
        parser().parse_args(["generate", "--build", "b", "--face", "p", "--prompt", "x", "--out", "o",
                             "--scheduler", "heun"])


def test_missing_build_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--build", str(tmp_path / "nope"), "--face", "p.jpg", "--prompt", "x",
                 "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "manifest.json not found: export the model first" in capsys.readouterr().err
    assert main(["serve", "--build", str(tmp_path / "nope")]) == 2
    assert "not a build directory" in capsys.readouterr().err

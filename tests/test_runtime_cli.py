"""`python -m runtime`: argument parsing and the errors that need no build (the full CLI runs in
tests/test_runtime_pipeline.py against the tiny build)."""
from __future__ import annotations

import pytest

from runtime.__main__ import _scale, main, parser
from runtime.console import UsageError


def test_generate_arguments():
    args = parser().parse_args(["generate", "--build", "b", "--face", "p.jpg", "--prompt", "x", "--out", "o.png",
                                "--pipeline", "ip-adapter-plus", "--ip-scale", "0.5,0.6", "--scheduler", "dpmpp_2m"])
    assert args.image == "p.jpg" and args.ip_scale == [0.5, 0.6] and args.scheduler == "dpmpp_2m"
    assert _scale("0.7") == 0.7
    with pytest.raises(UsageError, match="argument --scheduler: invalid choice: 'heun'.*see python -m runtime "
                       "generate --help"):
        parser().parse_args(["generate", "--build", "b", "--face", "p", "--prompt", "x", "--out", "o",
                             "--scheduler", "heun"])


def test_missing_build_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--build", str(tmp_path / "nope"), "--face", "p.jpg", "--prompt", "x",
                 "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "manifest.json not found: export the model first" in capsys.readouterr().err
    assert main(["serve", "--build", str(tmp_path / "nope")]) == 2
    assert "not a build directory" in capsys.readouterr().err


def test_request_flags_build_the_pipelines_request():
    """The request flags come from the request types: values reach the request as typed, a field the
    chosen pipeline does not have is refused by name, and bounds are the request's."""
    from runtime.__main__ import cli_request
    from runtime.requests import InstantIDRequest, RequestError

    base = ["generate", "--build", "b", "--face", "p.jpg", "--prompt", "x", "--out", "o.png"]
    entry, request = cli_request(parser().parse_args([*base, "--pipeline", "instantid", "--pose", "q.jpg",
                                                      "--controlnet-scale", "0.5", "--width", "128", "--height",
                                                      "64"]))
    assert entry.name == "instantid" and request == InstantIDRequest(
        "p.jpg", "x", pose_image="q.jpg", controlnet_scale=0.5, width=128, height=64)
    assert request.ip_scale == 0.8 and request.pose_image == "q.jpg"
    with pytest.raises(RequestError, match="--controlnet-scale: not a field of ip-adapter's request"):
        cli_request(parser().parse_args([*base, "--pipeline", "ip-adapter", "--controlnet-scale", "0.5"]))
    with pytest.raises(RequestError, match="num_images=17 is outside 1..16"):
        cli_request(parser().parse_args([*base, "--pipeline", "ip-adapter", "--num-images", "17"]))

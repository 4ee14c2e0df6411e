"""Long prompts and prompt weighting (runtime/text.py, runtime/prompt_weights.py) against compel.

compel (the `dev` extra) is the oracle: its parser for the weights per token, its
`Compel(truncate_long_prompts=False, downweight_mode=REMOVE)` on diffusers' text encoders (the same
tiny weights) for the embeddings, and diffusers' StableDiffusionXLPipeline + load_ip_adapter fed
compel's embeddings for the latents of the runtime's IP-Adapter pipeline (ONNX Runtime, fp32) on
the same prompt text. Then what a user sees: a prompt longer than the UNet's text axis is
truncated with a warning (the pipeline's Generation, the CLI's stderr, the HTTP answer), and
prompts of different lengths never share one loop.
"""
from __future__ import annotations

import base64
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_tiny import diffusers_sdxl_ip_adapter, relative_error

from export.specs import TINY
from runtime.prompt_weights import parse_prompt

SIZE, STEPS, SEED, IP_SCALE, GUIDANCE = 64, 3, 5, 0.6, 5.0
SENTENCE = ("a portrait of an old sailor with a (grey beard:1.3) and a [blue] cap, standing on the deck of a "
            "wooden ship. the sea is stormy++ and the sky is dark, waves crash against the hull; gulls fly over. ")
LONG = SENTENCE * 4 + "(oil painting)1.2, highly detailed, dramatic light--"  # 188 tokens: 3 chunks
NEGATIVE = "blurry, (low quality:1.2), [text]"
WORDS = ("red green house river stone cloud market lantern window garden bridge harbor mountain forest "
         "candle mirror painter violin sparrow meadow").split()
WORDS_300 = " ".join(WORDS[i % len(WORDS)] for i in range(300))
WORDS_100 = " ".join(WORDS_300.split()[:100])


def to_compel(prompt: str) -> str:
    """A1111 forms -> compel's: (text:w) -> (text)w, [text] -> (text)0.909..., (text) -> (text)1.1."""
    import re

    prompt = re.sub(r"\(([^()]*):([\d.]+)\)", r"(\1)\2", prompt)
    return re.sub(r"\[([^\[\]]*)\]", lambda m: f"({m.group(1)}){1 / 1.1:.12f}", prompt)


@pytest.fixture(scope="module")
def tokenizer(tiny_build):
    from runtime.text import ClipTokenizer

    return ClipTokenizer(tiny_build / "assets" / "tokenizer")


def token_weights(fragments, tokenizer) -> list[tuple[int, float]]:
    return [(token, float(weight)) for text, weight in fragments for token in tokenizer.ids(text)]


PARSER_TABLE = [  # (our syntax, the same in compel's)
    ("a red cat", None), ("a red++ cat", None), ("a cat--", None), ("a+++ b---", None), ("cat++, dog", None),
    ("(a red cat)1.3 on a mat", None), ("(a b)-- c", None), ("(a)+ b", None), ("a (b (c)1.5)0.5 d", None),
    ("(x).5 y", None), ("(x)0 y", None), ("a+b red-haired x - y", None), ("ab+.", None),
    ("a (red cat", None), ("a red) cat", None), ("a \\(b\\) c", None), ("", None),
    ("a (red:1.3) cat", "a (red)1.3 cat"), ("a [red] cat", None), ("a (red) cat", "a (red)1.1 cat"),
    ("(a, b:1.2) c", "(a, b)1.2 c"), ("((a))", "((a)1.1)1.1"), ("[[a]] b", f"((a){1 / 1.1:.12f}){1 / 1.1:.12f} b"), ("(a (b:1.5):0.5)", "(a (b)1.5)0.5"),
    (SENTENCE, None),
]


@pytest.mark.parametrize("ours, theirs", PARSER_TABLE)
def test_weights_per_token_equal_compels_parse(ours, theirs, tokenizer):
    """Every token gets compel's weight: directly for compel's syntax, via the compel spelling for A1111's."""
    from compel.prompt_parser import PromptParser

    theirs = to_compel(ours) if theirs is None else theirs
    parsed = PromptParser().parse_conjunction(theirs).prompts[0].children
    expected = token_weights([(f.text, f.weight) for f in parsed], tokenizer)
    got = token_weights(parse_prompt(ours), tokenizer)
    assert [t for t, _ in got] == [t for t, _ in expected], (ours, theirs)
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-9), (ours, theirs)


def test_malformed_syntax_never_raises():
    """Unbalanced, empty or odd groups read as text; every result is non-empty text with weights >= 0."""
    fixed = ["((a", "a))", "[(a]", "(a:)", "(:1.2)", "a\\", "\\(", "(a:1.2:1.3)", "++", "--a", "a (b:x) c",
             "(a:-1)", "([)]", ")(", "][", "(((((", "a:1.5", "(a)1.2.3", "\\\\(a)"]
    rng = random.Random(0)
    fuzz = ["".join(rng.choice("ab (:)[]+-.1\\ ") for _ in range(rng.randrange(1, 30))) for _ in range(500)]
    for prompt in fixed + fuzz:
        fragments = parse_prompt(prompt)
        assert fragments and all(isinstance(t, str) and w >= 0 for t, w in fragments), prompt
    assert parse_prompt("(a:)") == [("a:", pytest.approx(1.1))]
    assert parse_prompt("a (b") == [("a (b", 1.0)]


@pytest.fixture(scope="module")
def ip_adapter(tiny_build):
    from runtime.pipelines import IPAdapterPipeline

    torch.set_num_threads(1)
    return IPAdapterPipeline.from_build(tiny_build, "onnxruntime")


def compel_embeddings(weights: Path, prompt: str, negative: str | None):
    """compel on diffusers' text encoders, as CompelForSDXL pairs them, with DownweightMode.REMOVE:
    (embeds, pooled, negative embeds or None, negative pooled or None), padded to one length."""
    from compel import Compel, DownweightMode, ReturnedEmbeddingsType

    from export import loaders

    text = loaders.load_text_stack(TINY, weights)
    kinds = dict(returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                 truncate_long_prompts=False, downweight_mode=DownweightMode.REMOVE)
    first = Compel(tokenizer=text.tokenizer, text_encoder=text.text_encoder, **kinds)
    second = Compel(tokenizer=text.tokenizer_2, text_encoder=text.text_encoder_2, requires_pooled=True, **kinds)
    prompts = [to_compel(prompt)] + ([] if negative is None else [to_compel(negative)])
    plain = [" ".join(f.text for f in first.parse_prompt_string(p).prompts[0].children) for p in prompts]
    with torch.no_grad():  # pooled: compel's of the text without its syntax (compel pools the raw string)
        left = first(prompts)
        right, _ = second(prompts)
        pooled = second.conditioning_provider.get_pooled_embeddings(plain)
    embeds = torch.cat([left, right], dim=-1)
    if negative is None:
        return embeds, pooled, None, None
    return embeds[:1], pooled[:1], embeds[1:], pooled[1:]


def test_embeddings_equal_compel(ip_adapter, tiny_build):
    """The runtime's encoding (ONNX Runtime text encoders) of a 188-token weighted prompt = compel's."""
    tokens, pooled = ip_adapter.prompts(LONG)
    expected, expected_pooled, _, _ = compel_embeddings(tiny_build / "weights", LONG, None)
    assert tokens.shape == expected.shape == (1, 3 * 77, TINY.cross_attention_dim)
    error = float((tokens - expected).abs().max())
    pooled_error = float((pooled - expected_pooled).abs().max())
    print(f"{tokens.shape[1]} text tokens vs compel: max abs {error:.2e}, pooled {pooled_error:.2e}")
    assert error <= 1e-5 and pooled_error <= 1e-5
    rows = ip_adapter.prompts.rows([LONG], [NEGATIVE])  # the negative padded as compel pads it
    _, _, negative, negative_pooled = compel_embeddings(tiny_build / "weights", LONG, NEGATIVE)
    assert float((rows[2] - negative).abs().max()) <= 1e-5 and float((rows[3] - negative_pooled).abs().max()) <= 1e-5


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_build):
    """diffusers' SDXL pipeline + load_ip_adapter on the tiny files."""
    pipe = diffusers_sdxl_ip_adapter(tiny_build / "weights")
    pipe.set_ip_adapter_scale(IP_SCALE)
    return pipe


def diffusers_latents(pipe, embeds) -> torch.Tensor:
    """The diffusers pipeline's final latents, fed compel's embeddings."""
    from PIL import Image
    from skimage import data

    prompt_embeds, pooled, negative_embeds, negative_pooled = embeds
    with torch.no_grad():
        return pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative_embeds,
                    negative_pooled_prompt_embeds=negative_pooled, ip_adapter_image=Image.fromarray(data.coffee()),
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent").images


def runtime_generation(pipe, prompt: str, negative: str | None = None, **fields):
    from skimage import data

    return pipe(data.coffee(), prompt, negative, return_latents=True, steps=STEPS, guidance=GUIDANCE,
                ip_scale=IP_SCALE, seed=SEED, width=SIZE, height=SIZE, num_images=1, **fields)


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["zero-negative", "negative"])
def test_long_weighted_prompt_latents_equal_diffusers_with_compel(negative, ip_adapter, diffusers_pipe, tiny_build):
    """Runtime (ONNX Runtime, fp32) = diffusers fed compel's embeddings of the same prompt text."""
    generation = runtime_generation(ip_adapter, LONG, negative)
    expected = diffusers_latents(diffusers_pipe, compel_embeddings(tiny_build / "weights", LONG, negative))
    error = relative_error(generation.latents.numpy(), expected.numpy())
    print(f"long weighted prompt ({negative=}): runtime vs diffusers+compel latents rel {error:.2e}")
    assert error <= 1e-5 and generation.warnings == []


def test_long_prompt_changes_the_image_and_truncation_warns(ip_adapter):
    """300 words: more than the first 100 reach the UNet (other latents); past its 231 tokens the rest
    is dropped with a warning that says how many, the limit and how to raise it."""
    short = runtime_generation(ip_adapter, WORDS_100)
    long = runtime_generation(ip_adapter, WORDS_300)
    assert short.warnings == [] and relative_error(long.latents.numpy(), short.latents.numpy()) > 1e-2
    [warning] = long.warnings
    dropped = len(ip_adapter.prompts.tokenizers[0].ids(WORDS_300)) - 225
    assert f"truncated: {dropped} of its {dropped + 225} tokens were dropped" in warning
    assert "takes 231 text tokens" in warning and "--text-tokens 77:77:308 --force" in warning
    assert ip_adapter.prompts(WORDS_300)[0].shape[1] == 231


def test_prompts_of_different_lengths_never_share_a_loop(ip_adapter):
    """The text length is a loop setting: the server's batches split by it, each image as if alone."""
    from runtime.serve.served import ServedPipeline
    from runtime.requests import IPAdapterRequest
    from skimage import data

    requests = [IPAdapterRequest(data.coffee(), prompt, steps=1, seed=SEED, width=SIZE, height=SIZE)
                for prompt in ("a cup", LONG, "a mug")]
    prepared = [ip_adapter.prepare(r) for r in requests]
    assert [p.settings.text_tokens for p in prepared] == [77, 231, 77]
    assert prepared[0].settings == prepared[2].settings != prepared[1].settings
    with pytest.raises(ValueError, match="text_tokens"):
        ip_adapter.run(prepared[:2])
    results = list(ServedPipeline("ip-adapter", ip_adapter).run_batch(None, requests))
    assert all(isinstance(r, list) and len(r) == 1 for r in results), results
    alone = ip_adapter(requests[1])[0]
    assert np.array_equal(np.asarray(results[1][0]), np.asarray(alone))


def _static_text_build(build: Path, out: Path) -> Path:
    """`build` with its IP-Adapter UNet's text axis fixed at 77, as builds before the dynamic axis were."""
    import onnx

    shutil.copytree(build, out, ignore=shutil.ignore_patterns("weights", "torch", "engines"))
    model = onnx.load(str(build / "onnx" / "unet_ip_adapter.onnx"))
    [text] = [i for i in model.graph.input if i.name == "text_tokens"]
    text.type.tensor_type.shape.dim[1].dim_value = 77
    onnx.save(model, str(out / "onnx" / "unet_ip_adapter.onnx"))
    return out


def test_static_text_axis_truncates_as_before_with_a_warning(tiny_build, tmp_path):
    """An old build (text axis fixed at 77): the first 75 tokens, as the runtime always encoded them, and a
    warning that says to re-export."""
    from runtime.pipelines import IPAdapterPipeline
    from runtime.text import text_capacity

    pipe = IPAdapterPipeline.from_build(_static_text_build(tiny_build, tmp_path / "old"), verify_sha256=False)
    assert text_capacity(pipe.unet) == (77, False)
    tokens, pooled = pipe.prompts(WORDS_100)
    ids = [torch.from_numpy(t(WORDS_100)) for t in pipe.prompts.tokenizers]
    expected = torch.cat([e.run({"input_ids": i})["hidden_states"] for e, i in zip(pipe.prompts.encoders, ids)], -1)
    assert tokens.shape[1] == 77 and torch.equal(tokens, expected)
    [warning] = pipe.prompts.warnings([WORDS_100], None)
    assert "takes 77 text tokens" in warning and "re-export" in warning
    assert runtime_generation(pipe, WORDS_100).warnings == [warning]


def test_cli_prints_the_truncation_warning(tiny_build, tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from runtime.__main__ import main

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    code = main(["generate", "--build", str(tiny_build), "--pipeline", "ip-adapter", "--image", str(photo),
                 "--prompt", WORDS_300, "--steps", "1", "--width", str(SIZE), "--height", str(SIZE),
                 "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "out.png").is_file()
    assert "warning: prompt 'red green house" in err and "tokens were dropped" in err


def test_http_answer_carries_the_truncation_warning(ip_adapter):
    """JSON answers list it in `warnings`; image answers in the X-Warnings header."""
    import httpx
    from PIL import Image
    from serve_helpers import serve_in_thread, wait_ready

    from runtime.serve.app import ServeConfig, create_app
    from runtime.serve.inputs import Limits
    from runtime.serve.served import ServedPipeline

    app = create_app(ServeConfig(limits=Limits(max_side=512)), lambda: {"ip-adapter": ServedPipeline(
        "ip-adapter", ip_adapter, SIZE)})
    buffer = io.BytesIO()
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(buffer, "PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "steps": 1, "seed": SEED}
    with serve_in_thread(app) as url:
        wait_ready(url, 60)
        answer = httpx.post(url + "/v1/ip-adapter", json={**body, "prompt": WORDS_300, "output": "json"}, timeout=60)
        assert answer.status_code == 200, answer.text
        [warning] = answer.json()["warnings"]
        assert "tokens were dropped" in warning
        image = httpx.post(url + "/v1/ip-adapter", json={**body, "prompt": WORDS_300, "output": "image"}, timeout=60)
        assert image.status_code == 200 and "tokens were dropped" in image.headers["x-warnings"]
        plain = httpx.post(url + "/v1/ip-adapter", json={**body, "prompt": "a cup", "output": "json"}, timeout=60)
        assert plain.json()["warnings"] == [] and "x-warnings" not in plain.headers


def test_unet_profile_takes_the_text_axis(tiny_build):
    """The engine profile of the exported UNet covers the text axis (77..231 by default; --text-tokens)."""
    from engine.manifest import load_manifest
    from engine.profiles import Geometry, Range, parse_range, profile_for

    onnx = load_manifest(tiny_build).components["unet_ip_adapter"].onnx
    inputs = {t.name: t.shape for t in onnx.inputs}
    assert inputs["text_tokens"][1] == "text_tokens"
    assert profile_for(inputs, Geometry())["text_tokens"].max[1] == 231
    longer = Geometry(text_tokens=parse_range("77:154:385"))
    assert profile_for(inputs, longer)["text_tokens"].max[1] == 385 and longer.text_tokens == Range(77, 154, 385)


def test_baseline_encodes_prompts_as_the_runtime(ip_adapter, tiny_build):
    """The PyTorch baseline (no compel) chunks, weights, pads and truncates as the runtime: same
    embeddings, and runtime-vs-baseline latent parity for long prompts."""
    from skimage import data

    from benchmarks.pipelines import IPAdapterBaseline

    baseline = IPAdapterBaseline("tiny", weights_dir=tiny_build / "weights")
    ours = ip_adapter.prompts.rows([LONG], [NEGATIVE])
    theirs = baseline.encode_prompt(LONG, NEGATIVE)
    assert all(float((a - b).abs().max()) <= 1e-5 for a, b in zip(ours, theirs))
    for prompt in (LONG, WORDS_300):  # WORDS_300: both truncate at 231 tokens
        kwargs = dict(steps=STEPS, guidance=GUIDANCE, ip_scale=IP_SCALE, seed=SEED, width=SIZE, height=SIZE,
                      num_images=1)
        expected = baseline(data.coffee(), prompt, NEGATIVE, decode=False, **kwargs).latents
        error = relative_error(runtime_generation(ip_adapter, prompt, NEGATIVE).latents.numpy(), expected.numpy())
        print(f"runtime vs baseline, {len(prompt.split())}-word prompt: latents rel {error:.2e}")
        assert error <= 1e-5


def test_text_capacity_reads_the_session():
    """The limit: a static axis' size (old builds), the engine profile's max (TensorRT: the manifest's
    range), else the default profile's 231 (ONNX Runtime, torch)."""
    from engine.tensors import TensorSpec
    from runtime.text import text_capacity

    class Unet:
        def __init__(self, spec):
            self.spec = spec

        def input(self, name):
            return self.spec

    dims = ("2B", "text_tokens", 64)
    assert text_capacity(Unet(TensorSpec("text_tokens", torch.float16, dims, (1, 77, 64), (2, 77, 64),
                                         (8, 308, 64)))) == (308, True)
    assert text_capacity(Unet(TensorSpec("text_tokens", torch.float32, dims))) == (231, True)
    assert text_capacity(Unet(TensorSpec("text_tokens", torch.float32, ("2B", 77, 64)))) == (77, False)

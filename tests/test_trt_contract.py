"""runtime/trt.py and runtime/loop.py against a strict double of TensorRT and CUDA (tests/trt_double.py):
the binding, enqueue, warm-up and capture code of the runtime runs on the CPU and must keep every rule
the double enforces (alignment, checked refusals, per-context state, no default stream, one context per
graph, an enqueue before capture, TensorRT-RTX eager specialisation), and give the eager loop's numbers."""
from __future__ import annotations

import logging

import pytest
import torch

from export.specs import SCHEDULER_CONFIG
from runtime.loop import DenoiseCancelled, DenoiseLoop, LoopInputs
from runtime.schedulers import build_scheduler, draw_noise
from engine.tensors import TensorSpec
from runtime.sessions import SessionError
from runtime.trt import OUTPUT_CACHE_SIZE, DeviceMemoryPool, TrtSession
from tests.trt_double import (
    ALIGNMENT,
    DataType,
    DynamicShapesKernelSpecializationStrategy,
    EngineDouble,
    EngineSpec,
    FakeCuda,
    TrtModule,
)

F16, F32 = DataType.HALF, DataType.FLOAT
ROWS = (1, 4)


def _latent(channels):
    return (ROWS[0], channels, 4, 4), (ROWS[1], channels, 32, 32)


def _unet_noise(f):
    context = f["text_tokens"].mean((1, 2)) + f["ip_scale"].mean() * f["ip_tokens"].mean((1, 2)) + f["text_embeds"].mean(1)
    return {"noise_pred": 0.5 * f["sample"] + torch.cos(f["timestep"] / 300) + 0.1 * context[:, None, None, None]
            + 1e-3 * f["time_ids"][:, :1, None, None] + 0.2 * f["down_residual_0"] + 0.1 * f["mid_residual"]}


def _controlnet_residuals(f):
    base = (0.3 * f["sample"] + f["face_tokens"].mean((1, 2))[:, None, None, None]
            + f["control_image"].mean((1, 2, 3))[:, None, None, None])
    scale = f["conditioning_scale"]
    return {"down_residual_0": base * scale,
            "mid_residual": (base.mean(1, keepdim=True) + f["timestep"] / 1000) * scale}


def _common():
    return {"text_embeds": (F16, (1, 8), (4, 8)), "time_ids": (F32, (1, 6), (4, 6))}


def unet_spec(**extra) -> EngineSpec:
    return EngineSpec(
        inputs={"sample": (F16, *_latent(4)), "timestep": (F32, (1,), (1,)), "text_tokens": (F16, (1, 7, 5), (4, 7, 5)),
                "ip_tokens": (F16, (1, 3, 5), (4, 3, 5)), "ip_scale": (F32, (4,), (4,)), **_common(),
                "down_residual_0": (F16, *_latent(4)), "mid_residual": (F16, *_latent(1))},
        outputs={"noise_pred": (F16, lambda s: s["sample"])}, compute=_unet_noise, scratch=8192, **extra)


def controlnet_spec(**extra) -> EngineSpec:
    latent = lambda channels: lambda s: (s["sample"][0], channels, *s["sample"][2:])  # noqa: E731
    return EngineSpec(
        inputs={"sample": (F16, *_latent(4)), "timestep": (F32, (1,), (1,)), "face_tokens": (F16, (1, 3, 5), (4, 3, 5)),
                "control_image": (F16, (1, 3, 32, 32), (4, 3, 256, 256)), **_common(),
                "conditioning_scale": (F32, (1,), (1,))},
        outputs={"down_residual_0": (F16, latent(4)), "mid_residual": (F16, latent(1))},
        compute=_controlnet_residuals, scratch=12288, **extra)


def _infos(spec: EngineSpec, widen: int = 0):
    """The manifest's TensorSpecs of an engine double (widen: a manifest range wider than the plan's)."""
    def info(name, dtype, low, high):
        dims = tuple(lo if lo == hi else f"d{axis}" for axis, (lo, hi) in enumerate(zip(low, high)))
        high = tuple(hi + widen if lo != hi else hi for lo, hi in zip(low, high))
        return TensorSpec(name, "float32", dims, min=tuple(low), max=high)
    inputs = [info(name, *value) for name, value in spec.inputs.items()]
    outputs = [TensorSpec(name, "float32", ()) for name in spec.outputs]
    return inputs, outputs


class World:
    """A UNet and a ControlNet TrtSession over engine doubles sharing one scratch pool and one FakeCuda."""

    def __init__(self, flavour: str = "tensorrt", stream_capturable: bool = True):
        self.trt, self.cuda = TrtModule(flavour), FakeCuda()
        self.memory = DeviceMemoryPool("cpu")
        self.unet_engine = EngineDouble(self.trt, self.cuda, unet_spec(stream_capturable=stream_capturable))
        self.controlnet_engine = EngineDouble(self.trt, self.cuda, controlnet_spec(stream_capturable=stream_capturable))
        self.unet = self.session(self.unet_engine, "unet")
        self.controlnet = self.session(self.controlnet_engine, "controlnet")

    def session(self, engine, name, widen=0) -> TrtSession:
        inputs, outputs = _infos(engine.spec, widen)
        return TrtSession(engine, self.trt, inputs, outputs, name=name, device="cpu", memory=self.memory,
                          cuda=self.cuda)

    def engines(self):
        return self.unet_engine, self.controlnet_engine


def loop_inputs(scheduler: str, steps: int, batch: int, size: int, seed: int):
    """A plan and LoopInputs with CFG at latent size `size` (pixels 8x), float32 on the CPU."""
    plan = build_scheduler(SCHEDULER_CONFIG, scheduler).plan(steps)
    latents, step_noise = draw_noise(plan, (batch, 4, size, size), torch.Generator().manual_seed(seed))
    generator, rows = torch.Generator().manual_seed(seed + 100), 2 * batch
    text_embeds = torch.randn(rows, 8, generator=generator)
    time_ids = torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]]).repeat(rows, 1)
    unet_feeds = {"text_tokens": torch.randn(rows, 7, 5, generator=generator),
                  "ip_tokens": torch.randn(rows, 3, 5, generator=generator),
                  "ip_scale": torch.full((4,), 0.6), "text_embeds": text_embeds, "time_ids": time_ids}
    controlnet_feeds = {"face_tokens": unet_feeds["ip_tokens"], "text_embeds": text_embeds, "time_ids": time_ids,
                        "control_image": torch.rand(rows, 3, size * 8, size * 8, generator=generator),
                        "conditioning_scale": torch.tensor([0.8])}
    return plan, LoopInputs(latents, step_noise, torch.tensor(5.0), unet_feeds, controlnet_feeds)


def _unet_feeds(size: int, rows: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"sample": (rows, 4, size, size), "timestep": (1,), "text_tokens": (rows, 7, 5), "ip_tokens": (rows, 3, 5),
              "ip_scale": (4,), "text_embeds": (rows, 8), "time_ids": (rows, 6),
              "down_residual_0": (rows, 4, size, size), "mid_residual": (rows, 1, size, size)}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


# ---- the loop: graphs and eager calls interleaved equal eager-only runs -------------------------

SEQUENCE = [("euler", 8, 3), ("dpmpp_2m", 12, 4), ("euler_a", 12, 5), ("euler", 8, 6), ("dpmpp_2m", 12, 7),
            ("euler_a", 12, 8)]


@pytest.mark.parametrize("flavour", ["tensorrt", "tensorrt-rtx"])
@pytest.mark.parametrize("mode", ["graph", "step-graphs"])
def test_two_sizes_interleaved_through_graphs_and_eager_calls_equal_eager_only_runs(flavour, mode):
    world, reference = World(flavour), World(flavour)
    graphs = DenoiseLoop(world.unet, world.controlnet, mode=mode)
    eager = DenoiseLoop(world.unet, world.controlnet, mode="eager")  # the same sessions' eager contexts
    only_eager = DenoiseLoop(reference.unet, reference.controlnet, mode="eager")
    for index, (scheduler, size, seed) in enumerate(SEQUENCE):
        plan, inputs = loop_inputs(scheduler, 3, 1, size, seed)
        expected = only_eager.run(plan, inputs)
        latents = graphs.run(plan, inputs)
        assert graphs.last_path == mode
        torch.testing.assert_close(latents, expected, rtol=0, atol=0)
        other_plan, other = loop_inputs("euler", 2, 1, 20 - size, seed + 50)  # the other size, eager, in between
        torch.testing.assert_close(eager.run(other_plan, other), only_eager.run(other_plan, other), rtol=0, atol=0)
        feeds = _unet_feeds(4 + index)  # and a direct call at yet another size on the eager context
        torch.testing.assert_close(world.unet.run(feeds)["noise_pred"], reference.unet.run(feeds)["noise_pred"],
                                   rtol=0, atol=0)
    assert len(world.cuda.graphs) == 3 * (1 if mode == "graph" else 3)  # three keys, captured once each
    assert all(graph.replays == 2 for graph in world.cuda.graphs)  # each key ran twice: replayed both times
    assert all(not context.errors for engine in world.engines() for context in engine.contexts)


def _captured_contexts(world):
    return [context for graph in world.cuda.graphs for context in graph.contexts]


def test_one_context_per_captured_graph_and_a_separate_eager_context():
    world = World()
    loop = DenoiseLoop(world.unet, world.controlnet, mode="graph")
    for scheduler, size, seed in SEQUENCE[:3]:
        loop.run(*loop_inputs(scheduler, 2, 1, size, seed))
    captured = _captured_contexts(world)
    assert len(world.cuda.graphs) == 3 and all(len(graph.contexts) == 2 for graph in world.cuda.graphs)
    assert len({id(context) for context in captured}) == len(captured) == 6  # no context in two graphs
    assert world.unet._context not in captured and world.controlnet._context not in captured
    # every context, eager or captured, runs on the one scratch pool
    pool = (world.memory.buffer.data_ptr(), world.memory.buffer.numel())
    assert all(context.memory == pool for engine in world.engines() for context in engine.contexts)
    assert pool[0] % ALIGNMENT == 0 and pool[1] >= 12288


def test_capture_only_after_an_enqueue_at_that_shape_on_that_context():
    world = World()
    DenoiseLoop(world.unet, world.controlnet, mode="step-graphs").run(*loop_inputs("dpmpp_2m", 3, 1, 8, 0))
    for engine in world.engines():
        for position, event in enumerate(engine.log):
            if event.kind == "capture":
                before = [e for e in engine.log[:position] if e.context is event.context and e.kind == "eager"]
                assert before and before[-1].shapes == event.shapes
    # the double refuses a capture without that enqueue, and the runtime raises on the refusal
    plan, inputs = loop_inputs("euler", 2, 1, 8, 0)
    binding = world.unet.bind(_unet_feeds(8))
    stream = world.cuda.new_stream("cpu")
    assert "only after one enqueue" in binding.capture_blocker(stream)
    with pytest.raises(SessionError, match="enqueue failed"):
        world.cuda.capture(world.cuda.new_graph(), stream, lambda: binding.run(_unet_feeds(8)))
    assert "before one enqueue at these shapes" in binding.context.errors[-1]


def test_no_enqueue_on_the_default_stream():
    world = World()
    assert world.cuda.current_stream("cpu").cuda_stream == 0  # callers start on the legacy default stream
    world.unet.run(_unet_feeds(8))
    own = world.unet._stream
    assert own.cuda_stream != 0 and own.waited == [0] and world.cuda.default.waited == [own.cuda_stream]
    loop = DenoiseLoop(world.unet, world.controlnet, mode="graph")
    loop.run(*loop_inputs("euler", 2, 1, 8, 1))
    DenoiseLoop(world.unet, world.controlnet, mode="eager").run(*loop_inputs("euler", 2, 1, 12, 1))
    events = [event for engine in world.engines() for event in engine.log]
    assert {event.kind for event in events} == {"eager", "capture", "replay"}
    assert all(event.stream != 0 for event in events)
    assert {event.stream for event in events if event.kind != "eager"} == {loop._stream.cuda_stream}


def test_scalars_are_bound_at_aligned_buffers_of_their_own():
    world = World()
    plan, inputs = loop_inputs("euler", 3, 1, 8, 2)
    timesteps = plan.timesteps
    inside = range(timesteps.data_ptr(), timesteps.data_ptr() + timesteps.numel() * timesteps.element_size())
    DenoiseLoop(world.unet, world.controlnet, mode="graph").run(plan, inputs)
    DenoiseLoop(world.unet, world.controlnet, mode="eager").run(plan, inputs)
    for engine in world.engines():
        for context in engine.contexts:
            assert all(address % ALIGNMENT == 0 for address in context.addresses.values())
            assert context.addresses["timestep"] not in inside
    # the step-i timestep is a view 4*i bytes into the plan's table: TensorRT would refuse it
    assert not world.unet._context.set_tensor_address("timestep", timesteps[1].data_ptr())
    with pytest.raises(SessionError, match="not on a 256-byte boundary.*aligned_copy"):
        world.unet._set_address(world.unet._context, "timestep", timesteps[1:2])


def test_a_refused_binding_raises_a_session_error_naming_the_tensor():
    world = World()
    wide = world.session(world.unet_engine, "unet", widen=8)  # the manifest allows 40x40, the plan 32x32
    with pytest.raises(SessionError, match=r"refused shape \[2, 4, 36, 36\] for input 'sample'.*rebuild the engine"):
        wide.run(_unet_feeds(36))
    with pytest.raises(SessionError, match=r"refused address 0x[0-9a-f]+ for tensor 'latents'"):
        wide._set_address(wide._context, "latents", world.memory.buffer)
    assert wide.run(_unet_feeds(32))["noise_pred"].shape == (2, 4, 32, 32)  # inside both: runs


def test_eager_output_buffers_are_an_lru_of_input_shapes():
    world = World()
    for size in range(4, 4 + OUTPUT_CACHE_SIZE + 3):
        feeds = _unet_feeds(size, seed=size)
        noise = world.unet.run(feeds)["noise_pred"]
        rounded = {k: v.half().float() if world.unet.input(k).dtype == torch.float16 else v for k, v in feeds.items()}
        torch.testing.assert_close(noise, _unet_noise(rounded)["noise_pred"].half(), rtol=0, atol=0)
        assert len(world.unet._slots) == min(size - 3, OUTPUT_CACHE_SIZE)
    assert [key[0][2] for key in world.unet._slots] == list(range(7, 11))  # the latest four sizes
    kept = world.unet.run(_unet_feeds(10))["noise_pred"]  # a cached shape reuses its buffer
    assert kept.data_ptr() == world.unet.run(_unet_feeds(10, seed=1))["noise_pred"].data_ptr()


def test_tensorrt_rtx_specialises_eagerly_and_keeps_its_own_graphs_off():
    world = World("tensorrt-rtx")
    DenoiseLoop(world.unet, world.controlnet, mode="graph").run(*loop_inputs("euler", 2, 1, 8, 0))
    contexts = [context for engine in world.engines() for context in engine.contexts]
    assert contexts and all(c.specialization == DynamicShapesKernelSpecializationStrategy.EAGER for c in contexts)
    assert all(c.config.cuda_graph_strategy.name == "DISABLED" for c in contexts)
    assert all(c.strategy.name == "USER_MANAGED" for c in contexts)


def test_a_context_that_is_not_stream_capturable_runs_eager_and_says_why(caplog):
    world, reference = World("tensorrt-rtx", stream_capturable=False), World("tensorrt-rtx")
    plan, inputs = loop_inputs("dpmpp_2m", 3, 1, 8, 9)
    loop = DenoiseLoop(world.unet, world.controlnet, mode="graph")
    with caplog.at_level(logging.WARNING, logger="runtime.loop"):
        latents = loop.run(plan, inputs)
    assert loop.last_path == "eager" and not world.cuda.graphs
    assert "is_stream_capturable is False" in caplog.text
    expected = DenoiseLoop(reference.unet, reference.controlnet, mode="eager").run(plan, inputs)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    assert loop.run(plan, inputs).equal(expected) and loop.last_path == "eager"  # decided once per key


def test_warm_up_captures_so_the_first_request_replays():
    world = World()
    loop = DenoiseLoop(world.unet, world.controlnet, mode="graph")
    plan, warm = loop_inputs("euler", 4, 1, 8, 0)
    assert loop.warm_up(plan, warm) == "graph" and len(world.cuda.graphs) == 1
    _, request = loop_inputs("euler", 4, 1, 8, 11)
    loop.run(plan, request)
    assert len(world.cuda.graphs) == 1 and world.cuda.graphs[0].replays == 2


@pytest.mark.parametrize("mode,stop_at,message", [("step-graphs", 2, "before step 3 of 3"),
                                                   ("graph", 0, "before step 1 of 3")])
def test_graph_paths_can_be_cancelled(mode, stop_at, message):
    world = World()
    loop = DenoiseLoop(world.unet, world.controlnet, mode=mode)
    plan, inputs = loop_inputs("euler", 3, 1, 8, 0)
    loop.warm_up(plan, inputs)
    calls = []

    def should_stop():
        calls.append(None)
        return len(calls) > stop_at

    with pytest.raises(DenoiseCancelled, match=message):
        loop.run(plan, inputs, should_stop=should_stop)

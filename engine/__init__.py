"""ONNX -> TensorRT engines for the build directory (see DESIGN.md, "The build directory").

Modules: backend (tensorrt / tensorrt-rtx adapter and capabilities), profiles (geometry and
the dynamic-axis naming convention), build (one engine), build_all (every component, cached),
manifest (manifest.json records), cache (rebuild decisions, load-time checks), refit.
No module imports TensorRT until a backend is loaded.
"""
from engine.backend import Backend, BackendError, GpuInfo, detect_gpu, load_backend
from engine.build import EngineBuildError, OnnxParseError, build_engine
from engine.build_all import BuildResult, build_all
from engine.cache import EngineCheckError, check_engine, needs_rebuild
from engine.manifest import (BuildFlags, EngineRecord, Manifest, OnnxRecord, load_manifest,
                             record_onnx, save_manifest)
from engine.profiles import Geometry, ProfileError, Range, ShapeRange, profile_for

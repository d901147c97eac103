"""The onnxruntime backend: serves an export directory with onnxruntime, numpy, PIL and tokenizers.

No torch here, ever (a test runs it with torch absent from ``sys.modules``).

Hot-swap: each tower graph outputs both ``embeddings`` and ``features`` (the input of the
final projection). The backend reads the projection matrices out of the graph file itself
(runtime/onnxfile.py), checks them against the manifest's fingerprints, and computes
``embeddings = features @ W`` in numpy with the current matrix: applying or removing a
patch only replaces ``W`` (milliseconds; no file is written, no session rebuilt), and text
features are cached per prompt, so re-classifying after a swap re-encodes nothing. A
projection the export could not prove re-projectable falls back to rebuilding that tower's
session with ``SessionOptions.add_initializer`` (names checked against the graph first,
since onnxruntime ignores unknown ones).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fit import TargetInfo, apply_in_order, recorded_marks
from forgetpack.format.manifest import GRAPH_ID_KEY, Manifest
from forgetpack.format.manifest_schema import SEQUENCE_AXIS
from forgetpack.format.onnxfile import OnnxFile
from forgetpack.format.patch import Patch, fingerprint
from runtime.backends import Backend, check_threads, check_towers
from runtime.preprocess import Preprocessor
from runtime.text_cache import TextFeatureCache
from runtime.tokenizer import TextTokenizer

SHORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
               "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}
TEXT_CACHE_SIZE = 65536
TEXT_BATCH = 64
IMAGE_BATCH = 32

ProviderSpec = str | tuple[str, dict[str, Any]]


def resolve_providers(providers: Sequence[ProviderSpec] | str | None) -> list[ProviderSpec]:
    """Provider names (``"cuda"`` or ``"CUDAExecutionProvider"``, optionally with options), checked
    against this onnxruntime build: asking for one it lacks is a clear error, not a silent CPU run."""
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    available = ort.get_available_providers()
    out: list[ProviderSpec] = []
    for spec in providers:
        valid = isinstance(spec, str) or (isinstance(spec, (tuple, list)) and len(spec) == 2
                                          and isinstance(spec[0], str) and isinstance(spec[1], dict))
        if not valid:
            raise ForgetpackError(f"execution provider {spec!r} is neither a name nor a (name, options) pair")
        name, options = (spec, None) if isinstance(spec, str) else (spec[0], spec[1])
        name = SHORT_NAMES.get(name.strip().lower(), name.strip())
        if name not in available:
            hint = " (install onnxruntime-gpu with a matching CUDA and cuDNN)" if name == "CUDAExecutionProvider" else ""
            raise ForgetpackError(
                f"execution provider {name} is not available in this onnxruntime {ort.__version__} "
                f"(available: {', '.join(available)}){hint}"
            )
        out.append(name if options is None else (name, options))
    if "CPUExecutionProvider" not in [p if isinstance(p, str) else p[0] for p in out]:
        out.append("CPUExecutionProvider")  # for the ops another provider does not implement
    return out


@dataclass(frozen=True)
class _State:
    """Everything a patch set decides, swapped as one reference so readers never see half of it."""

    matrices: dict[str, np.ndarray]  # current projection matrices (graph + baked + hot patches)
    forms: dict[str, np.ndarray]  # the same as float32 ``M`` of ``embeddings = features @ M``
    sessions: dict[str, Any]  # per tower; rebuilt only for towers that cannot re-project


class OnnxBackend(Backend):
    """Serve an export directory with onnxruntime.

    ``towers`` (e.g. ``("text",)``): start sessions for these towers only; the others cost no memory and cannot encode.
    ``spin=False``: onnxruntime's intra-op threads sleep between runs instead of spin-waiting for
    the next. Spinning suits one caller running batch after batch; a server whose event loop,
    decoding threads and batcher share the cores turns it off (on mini, 2 cores: 491 requests/s
    against 312 with spinning)."""

    name = "onnx"

    def __init__(
        self,
        source: str | os.PathLike[str],
        providers: Sequence[ProviderSpec] | str | None = None,
        threads: int | None = None,
        towers: Sequence[str] | None = None,
        spin: bool = True,
        **options: Any,
    ):
        if options:
            raise ForgetpackError(f"unknown option(s) for the onnx backend: {', '.join(sorted(options))}")
        self.directory = Path(source)
        self.manifest = manifest = Manifest.read(self.directory)
        self.model_id = manifest.model_id
        self.logit_scale = manifest.logit_scale
        self.baked = tuple(p["digest"] for p in manifest.patches)
        self._baked_marks = recorded_marks(manifest.patches)  # digests and recipes: a regenerated duplicate is refused too
        self.providers = resolve_providers(providers)
        self.threads = check_threads(threads)
        self.spin = bool(spin)
        self.towers = check_towers(towers, tuple(manifest.towers), str(self.directory))  # the ones given sessions
        self._graphs = {name: self._open_graph(name) for name in manifest.towers}
        self._graph_matrices: dict[str, np.ndarray] = {}
        self._bias: dict[str, np.ndarray | None] = {}
        for target, proj in manifest.projections.items():
            graph = self._graphs[proj.tower]
            matrix = self._read(graph, proj.initializer)
            if list(matrix.shape) != list(proj.shape) or fingerprint(matrix) != proj.current:
                raise ForgetpackError(
                    f"{graph.path}: initializer {proj.initializer!r} does not match the manifest "
                    f"(fingerprint {fingerprint(matrix)[:23]}…, manifest says {proj.current[:23]}…): manifest and graph are from different exports"
                )
            self._graph_matrices[target] = matrix
            self._bias[target] = self._read(graph, proj.bias).astype(np.float32) if proj.bias else None
        self.targets = {t: TargetInfo(tuple(p.shape), p.base, p.layout) for t, p in manifest.projections.items()}
        self._matmul = self._projector()
        self._state = _State(dict(self._graph_matrices), self._feature_forms(self._graph_matrices),
                             {name: self._session(name, {}) for name in self.towers})
        self._preprocess = Preprocessor(manifest.preprocess) if "image" in self.towers else None
        self._tokenizer = TextTokenizer(self.directory, manifest.tokenizer) if "text" in self.towers else None
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_lock = threading.Lock()
        self._text_store: TextFeatureCache | None = None  # on disk, shared by processes (runtime/text_cache.py)
        self.encoded_prompts = 0  # prompts this backend ran through the text graph (misses of both caches)

    # -- loading ---------------------------------------------------------------------

    def _open_graph(self, tower: str) -> OnnxFile:
        spec = self.manifest.towers[tower]
        path = self.directory / spec.file
        if not path.is_file():
            raise ForgetpackError(f"{self.directory}: the manifest lists {spec.file} for the {tower} tower, but it is missing")
        graph = OnnxFile(path)
        found = graph.metadata.get(GRAPH_ID_KEY)
        if found != self.manifest.graph_id:
            raise ForgetpackError(
                f"{path}: belongs to another export (graph id {str(found)[:23]}…, manifest {self.manifest.graph_id[:23]}…): "
                "manifest and graph do not match"
            )
        return graph

    @staticmethod
    def _read(graph: OnnxFile, name: str) -> np.ndarray:
        info = graph.initializers.get(name)
        if info is None:
            raise ForgetpackError(f"{graph.path}: has no initializer {name!r}, which the manifest names: manifest and graph do not match")
        return info.array()

    def _session(self, tower: str, overrides: dict[str, np.ndarray]) -> Any:
        import onnxruntime as ort

        spec = self.manifest.towers[tower]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        keep = []  # the arrays and OrtValues handed to add_initializer must outlive the session
        for name, value in overrides.items():
            if name not in self._graphs[tower].initializers:  # onnxruntime would silently ignore it
                raise ForgetpackError(f"{spec.file}: has no initializer {name!r} to replace")
            value = np.ascontiguousarray(value)
            ort_value = ort.OrtValue.ortvalue_from_numpy(value)
            keep += [value, ort_value]
            options.add_initializer(name, ort_value)
        path = self.directory / spec.file
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ForgetpackError(f"{path}: onnxruntime cannot load it ({' '.join(str(exc).split())[:300]})") from None
        session._forgetpack_keep = (options, keep)  # freed with the session, never before (a freed one segfaults)
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        missing = [p for p in wanted if p not in session.get_providers()]
        if missing:
            raise ForgetpackError(f"execution provider {missing[0]} could not be initialised (onnxruntime fell back to {', '.join(session.get_providers())})")
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        expected_out = {spec.embeddings} | ({spec.features} if spec.features else set())
        if spec.input not in inputs or len(inputs) != 1 or not expected_out <= outputs:
            raise ForgetpackError(
                f"{path}: inputs {sorted(inputs)} / outputs {sorted(outputs)} do not match the manifest "
                f"({spec.input} / {sorted(expected_out)}): manifest and graph do not match"
            )
        if len(inputs[spec.input].shape) != len(spec.input_shape):
            raise ForgetpackError(f"{path}: input {spec.input} has rank {len(inputs[spec.input].shape)}, the manifest says {len(spec.input_shape)}")
        return session

    # -- encoding --------------------------------------------------------------------

    def _reprojects(self, tower: str) -> str | None:
        """The target re-projected in numpy for ``tower``, or None (use the graph's embeddings)."""
        target = self.manifest.towers[tower].projection
        if target is None or not self.manifest.projections[target].reproject:
            return None
        return target

    def _feature_forms(self, matrices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each matrix as the contiguous float32 ``M`` of ``embeddings = features @ M``."""
        return {t: np.ascontiguousarray(m if self.targets[t].layout == "in_out" else m.T, dtype=np.float32)
                for t, m in matrices.items()}

    @staticmethod
    def _projector() -> Any:
        """A one-MatMul session on one CPU thread for re-projection (see onnxfile.matmul_graph)."""
        import onnxruntime as ort

        from forgetpack.format.onnxfile import matmul_graph

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(matmul_graph(), options, providers=["CPUExecutionProvider"])

    def _project(self, state: _State, target: str, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros((0, state.forms[target].shape[1]), np.float32)
        (out,) = self._matmul.run(None, {"x": np.ascontiguousarray(features, dtype=np.float32), "w": state.forms[target]})
        bias = self._bias[target]
        return out + bias if bias is not None else out

    def _run(self, state: _State, tower: str, batch: np.ndarray) -> np.ndarray:
        spec = self.manifest.towers[tower]
        target = self._reprojects(tower)
        output = spec.features if target is not None else spec.embeddings
        (result,) = state.sessions[tower].run([output], {spec.input: batch})
        return result

    def encode_images(self, images: Sequence[Any], state: _State | None = None) -> np.ndarray:
        self._require("image")
        state = state or self._state  # one patch state for the whole call (a per-request one from state_for)
        chunks = [self._run(state, "image", np.stack([self._preprocess(im) for im in images[i : i + IMAGE_BATCH]]))
                  for i in range(0, len(images), IMAGE_BATCH)]
        out = np.concatenate(chunks) if chunks else np.zeros((0, self.manifest.embed_dim), np.float32)
        target = self._reprojects("image")
        return self._project(state, target, out) if target is not None else out

    def encode_texts(self, texts: Sequence[str], state: _State | None = None) -> np.ndarray:
        state = state or self._state
        target = self._reprojects("text")
        if target is None:  # no cache: embeddings depend on the (possibly rebuilt) session
            self._require("text")
            chunks = [self._run(state, "text", self._tokenizer(list(texts[i : i + TEXT_BATCH])))
                      for i in range(0, len(texts), TEXT_BATCH)]
            return np.concatenate(chunks) if chunks else np.zeros((0, self.manifest.embed_dim), np.float32)
        return self._project(state, target, self.text_features(texts))

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Pre-projection text features ``[n, width]`` (the graph's ``features`` output), cached per text."""
        self._require("text")
        if self.manifest.towers["text"].features is None:
            raise ForgetpackError(f"{self.directory}: the text graph has no features output")
        spec = self.manifest.towers["text"]
        width = self.targets[spec.projection].shape[0 if self.targets[spec.projection].layout == "in_out" else 1]
        if not texts:
            return np.zeros((0, width), np.float32)
        with self._text_cache_lock:
            found = {t: self._text_cache[t] for t in texts if t in self._text_cache}
            if self._text_store is None:
                self._text_store = TextFeatureCache(self.manifest.export_id, width)
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo:
            found.update(self._text_store.get(todo))
            todo = [t for t in todo if t not in found]
        if todo:
            encoded = self._encode_text_features(todo)
            found.update(encoded)
            self._text_store.put(encoded)
        with self._text_cache_lock:  # LRU bookkeeping under a lock: concurrent callers never race an eviction
            for text in texts:
                self._text_cache[text] = found[text]
                self._text_cache.move_to_end(text)
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def _encode_text_features(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the text graph. A graph with a dynamic sequence axis gets the prompts sorted by
        token count, each batch cut to its longest prompt: the same features as the full
        context (the padding after a prompt changes nothing), at a fraction of the work."""
        spec = self.manifest.towers["text"]
        ids = self._tokenizer.token_ids(texts)
        cut = spec.input_shape[1:] == [SEQUENCE_AXIS] and self._tokenizer.cuts
        order = sorted(range(len(texts)), key=lambda i: len(ids[i])) if cut else list(range(len(texts)))
        session = self._state.sessions["text"]  # features do not depend on patches: any state's session
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(order), TEXT_BATCH):
            chunk = order[start : start + TEXT_BATCH]
            batch = self._tokenizer.pad([ids[i] for i in chunk], max(len(ids[i]) for i in chunk) if cut else None)
            (rows,) = session.run([spec.features], {spec.input: batch})
            out.update(zip((texts[i] for i in chunk), rows, strict=True))
            self.encoded_prompts += len(chunk)
        return out

    def _require(self, tower: str) -> None:
        if tower not in self.manifest.towers:
            raise ForgetpackError(f"{self.directory}: this export has no {tower} tower")
        if tower not in self.towers:
            raise ForgetpackError(f"{self.directory}: was loaded without its {tower} tower (towers={list(self.towers)}); load it with that tower to encode {tower}s")

    @property
    def matrices(self) -> dict[str, np.ndarray]:
        """Copies of the current projection matrices (graph state plus hot-applied patches)."""
        return {name: m.copy() for name, m in self._state.matrices.items()}

    # -- patches ---------------------------------------------------------------------

    def set_patches(self, patches: Sequence[Patch]) -> None:
        matrices = apply_in_order(self._graph_matrices, patches, self.targets, model=self.model_id, applied=self._baked_marks)
        old = self._state
        sessions = dict(old.sessions)
        for tower in self.towers:
            target = self.manifest.towers[tower].projection
            if target is None or self._reprojects(tower) is not None:
                continue
            if not np.array_equal(matrices[target], old.matrices[target]):
                # fallback: rebuild this tower's session with the patched initializer
                overrides = {} if np.array_equal(matrices[target], self._graph_matrices[target]) else {
                    self.manifest.projections[target].initializer: matrices[target]}
                sessions[tower] = self._session(tower, overrides)
        self._state = _State(matrices, self._feature_forms(matrices), sessions)  # one atomic swap

    # -- per-request patch states (runtime.serve) ------------------------------------

    def state_for(self, patches: Sequence[Patch]) -> _State:
        """An immutable state for ``patches`` (in order, on the base plus baked patches), leaving the
        model's own state alone: pass it to ``encode_images``/``encode_texts`` as ``state=``.

        Built exactly as ``set_patches`` builds one. A tower that cannot re-project in numpy would need
        its own onnxruntime session per state, so a patch set that changes such a tower is refused."""
        matrices = apply_in_order(self._graph_matrices, patches, self.targets, model=self.model_id, applied=self._baked_marks)
        current = self._state
        for tower in self.towers:
            target = self.manifest.towers[tower].projection
            if target is None or self._reprojects(tower) is not None:
                continue
            if not np.array_equal(matrices[target], current.matrices[target]):
                raise ForgetpackError(
                    f"{self.directory}: the {tower} projection of this export cannot be re-projected in numpy (reproject: false), "
                    "so per-request patch sets that change it are not served; apply them with set_patches instead")
        return _State(matrices, self._feature_forms(matrices), dict(current.sessions))

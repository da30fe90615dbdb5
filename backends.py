"""Model runtimes behind one interface: Keras (TensorFlow, JAX... whatever Keras runs on) and LiteRT.

The service only calls ``forward(images, features, tta) -> (scores, embeddings, feature-map means)`` per TTA
view; which runtime answers is chosen once, when the service is built. LiteRT (``ai-edge-litert``, XNNPACK on
CPU) runs the exported ``<model>.tflite`` without TensorFlow: a worker with ``requirements-lite.txt`` never
imports TensorFlow or Keras.
Exporting needs TensorFlow.

Nothing heavy is imported at module import: each runtime is imported when a backend of its kind is built.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import data_loader
from report import atomic_path

logger = logging.getLogger("inference_runner")

BACKENDS = ("auto", "keras", "litert")
SIGNATURE = "serving_default"
IMAGE_INPUT, FEATURE_INPUT, EMBEDDING_OUTPUT = "image", "features", "embedding"
FULL_INSTALL = "pip install -r requirements.txt (the full install, with TensorFlow)"
LITE_INSTALL = "pip install ai-edge-litert (in requirements.txt and requirements-lite.txt)"


class ArtifactError(Exception):
    """A model, scaler or thresholds file is missing, unreadable or inconsistent (or its runtime is missing)."""


Outputs = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # scores, embeddings, feature-map means per view


class ModelBackend(Protocol):
    """What the service needs from a runtime: one forward pass over a batch, and facts about the model."""

    name: str  # "keras" or "litert"
    artifact: Path  # the file the runtime loaded
    threads: int | None  # the runtime's compute threads (None: the runtime's own default)
    channels: int  # image channels the model takes (1 or 3)
    n_outputs: int
    outputs_probabilities: bool  # the first output is softmax probabilities (else logits)

    tta_views: int  # views per file with TTA (:func:`tta_view_count`); one without
    has_layer_means: bool  # the model outputs its feature-map means (an export made before the layer gate does not)

    def forward(self, images: np.ndarray, features: np.ndarray, tta: bool) -> Outputs:
        """(B, 448, 448) float32 planes and (B, F) scaled features -> (B, V, K) scores, (B, V, E) embeddings and
        (B, V, L) feature-map means (None without ``has_layer_means``) for the V views of :func:`tta_views`
        (V = ``tta_views`` with TTA, else 1)."""
        ...


FULL_TTA_VIEWS = 4  # identity, left-right flip, up-down flip, 180-degree rotation
ROTATED_VIEW = "view_rotated_180"  # training.ensemble feeds alternate members each view through this sub-model
LAYER_MEANS_OUTPUT = "layer_means"  # the third output: channel means of the last feature maps (the layer gate's)
LAYER_GATE_MAPS = 3  # how many of the image path's last activation maps the layer gate measures


def tta_views(images: np.ndarray, count: int) -> list[np.ndarray]:
    """The first ``count`` (1, 2 or 4) views of (B, H, W) planes the model scores: identity, the left-right flip,
    the up-down flip and the 180-degree rotation (a sky image has no preferred orientation)."""
    views = [images, images[:, :, ::-1], images[:, ::-1, :], images[:, ::-1, ::-1]]
    if count not in (1, 2, FULL_TTA_VIEWS):
        raise ValueError(f"TTA takes 1, 2 or {FULL_TTA_VIEWS} views, not {count}")
    return views[:count]


def has_rotated_view(model: Any) -> bool:
    """Whether a Keras model feeds some of its layers the image rotated by 180 degrees (``training.ensemble``)."""
    return any(layer.name == ROTATED_VIEW for layer in model.layers)


def tta_view_count(model: Any) -> int:
    """Views per file with TTA for a Keras model: 2 for an ensemble whose alternate members see each view rotated
    by 180 degrees (two views then give its members the four views between them), else all four."""
    return 2 if has_rotated_view(model) and ensemble_head(model) is not None else FULL_TTA_VIEWS


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def litert_path_for(model_path: str | os.PathLike[str]) -> Path:
    """Where the LiteRT export of a Keras model lives: next to it, ``.tflite`` instead of ``.keras``."""
    return Path(model_path).with_suffix(".tflite")


def installed(module: str) -> bool:
    """Whether a runtime can be imported, without importing it (TensorFlow alone costs seconds and ~500 MB)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # blocked with sys.modules[name] = None, or a broken installation
        return False


def require_full_install(task: str) -> None:
    """Refuse, naming the install, work that needs TensorFlow and Keras (training, calibration, export)."""
    missing = [module for module in ("tensorflow", "keras") if not installed(module)]
    if missing:
        raise ArtifactError(f"{task} needs the full install ({' and '.join(missing)} missing here): {FULL_INSTALL}")


def gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, judged from the device files (importing TensorFlow to ask would cost
    the lite worker what it exists to avoid). ``CUDA_VISIBLE_DEVICES=""`` or ``-1`` hides them."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None and devices.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


@contextlib.contextmanager
def stderr_silenced(silence: bool) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: TensorFlow's and LiteRT's C++ start-up lines (oneDNN,
    CUDA probe, XNNPACK delegate) are written there before any Python logging setting can reach them."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet() -> bool:
    return not logger.isEnabledFor(logging.DEBUG)


def import_keras() -> Any:
    """Import Keras (and TensorFlow under it) quietly: its C++ start-up chatter is shown only at DEBUG
    (``--verbose``). Later C++ messages below FATAL are muted through TF_CPP_MIN_LOG_LEVEL unless the caller set
    it. A missing Keras is an ArtifactError that names the install to use."""
    if sys.modules.get("keras") is None:
        if not installed("keras"):
            raise ArtifactError(f"Keras is not installed (a lite install?): this needs {FULL_INSTALL}")
        quiet = _quiet()
        if quiet:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with stderr_silenced(quiet):
            import keras  # noqa: F401
    return sys.modules["keras"]


def final_layer(model: Any) -> Any:
    """The last layer that has weights (the final Dense)."""
    for layer in reversed(model.layers):
        if layer.weights:
            return layer
    raise ArtifactError("the model has no layer with weights")


def embedding_tensor(model: Any) -> Any:
    """The input of the final layer: the model's embedding."""
    return final_layer(model).input


MEMBER_PREFIX = "member_"  # training.ensemble names each member's sub-model with this prefix


def ensemble_head(model: Any) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """The final layer's kernel and bias and each member's embedding width, for an ensemble merged by
    ``training.ensemble`` (nested ``member_<i>`` models whose embeddings, concatenated, feed the final layer);
    None for any other model."""
    members = _members(model)
    kernel, bias = final_layer(model).get_weights()
    sizes = [int(member.output.shape[-1]) for member in members]
    if len(members) < 2 or sum(sizes) != kernel.shape[0]:
        return None
    return kernel, bias, sizes


def ends_in_softmax(model: Any) -> bool:
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "") if activation is not None else ""
    return type(last).__name__ == "Softmax" or name == "softmax"


def check_input_shapes(path: Path, image_shape: tuple, feature_shape: tuple) -> int:
    """The image channels, after checking both inputs are what data_loader produces."""
    if len(image_shape) != 4 or tuple(image_shape[1:3]) != (data_loader.IMAGE_SIZE, data_loader.IMAGE_SIZE) \
            or int(image_shape[3]) not in (1, 3):
        raise ArtifactError(f"{path}: image input {tuple(image_shape)} is not (N,{data_loader.IMAGE_SIZE},"
                            f"{data_loader.IMAGE_SIZE},1|3)")
    if len(feature_shape) != 2 or int(feature_shape[1]) != data_loader.N_FEATURES:
        raise ArtifactError(f"{path}: feature input {tuple(feature_shape)} is not (N,{data_loader.N_FEATURES}) as "
                            f"data_loader produces")
    return int(image_shape[3])


def describe_inputs(model: Any, path: Path) -> tuple[str, str, int]:
    """A Keras model's image and feature input names and its image channels (checked against data_loader)."""
    by_rank = {len(tensor.shape): tensor for tensor in model.inputs}
    if set(by_rank) != {2, 4}:
        raise ArtifactError(f"{path}: expected an image input (N,448,448,1|3) and a feature input "
                            f"(N,{data_loader.N_FEATURES})")
    image, features = by_rank[4], by_rank[2]
    channels = check_input_shapes(path, tuple(image.shape), tuple(features.shape))
    return image.name.split(":")[0], features.name.split(":")[0], channels


def _configure_tensorflow_threads(intra_op: int, inter_op: int | None) -> None:
    """Thread pools must be set before TensorFlow runs its first op; later calls are ignored."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    import_keras()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op or 1)
    except RuntimeError:
        logger.debug("TensorFlow already initialised; thread settings unchanged")


def load_keras_model(path: Path) -> Any:
    """A saved Keras model, or an ArtifactError that names the file."""
    keras = import_keras()
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors...
        raise ArtifactError(f"{path}: cannot load Keras model: {exc}") from exc


def _feature_maps(branch: Any) -> list[Any]:
    """The last ``LAYER_GATE_MAPS`` activation maps of ``branch``'s image path (symbolic outputs of its layers)."""
    keras = import_keras()
    return [layer.output for layer in branch.layers
            if isinstance(layer, keras.layers.Activation) and len(layer.output.shape) == 4][-LAYER_GATE_MAPS:]


def _feature_map_means(branch: Any) -> Any | None:
    """The channel means of :func:`_feature_maps`, concatenated; None when ``branch`` has no activation map."""
    keras = import_keras()
    maps = _feature_maps(branch)
    if not maps:
        return None
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"{LAYER_MEANS_OUTPUT}_{i}")(m) for i, m in enumerate(maps)]
    return keras.layers.Concatenate(name=LAYER_MEANS_OUTPUT)(pooled)


def feature_map_sizes(model: Any) -> tuple[int, ...]:
    """The width of each activation map whose channel means :func:`forward_model` outputs (the layer gate's
    blocks): the first member's for an ensemble."""
    members = _members(model)
    return tuple(int(m.shape[-1]) for m in _feature_maps(members[0] if members else model))


def _members(model: Any) -> list[Any]:
    """An ensemble's member sub-models in order (``training.ensemble``); [] for any other model."""
    members = [layer for layer in model.layers if layer.name.startswith(MEMBER_PREFIX) and hasattr(layer, "layers")]
    return sorted(members, key=lambda layer: int(layer.name[len(MEMBER_PREFIX):]))


def forward_model(model: Any) -> Any:
    """What both runtimes run: the model with its embedding as a second output and, as a third, the channel means
    of the last feature maps of its (first member's) image path, which the layer gate measures."""
    keras = import_keras()
    members = _members(model)
    if not members:
        means = _feature_map_means(model)
        extra = [] if means is None else [means]
        return keras.Model(model.inputs, [model.outputs[0], embedding_tensor(model), *extra])
    return _ensemble_forward(model, members)


def _ensemble_forward(model: Any, members: list[Any]) -> Any:
    """The ensemble's graph (``training.ensemble``) called anew on the same layers, its first member extended
    to output its feature-map means: a nested member's inner tensors are not outputs the outer graph can name."""
    keras = import_keras()
    image_name, feature_name, _ = describe_inputs(model, Path(model.name))
    by_name = {tensor.name.split(":")[0]: tensor for tensor in model.inputs}
    inputs = {key: keras.Input(tuple(by_name[key].shape[1:]), name=key) for key in (image_name, feature_name)}
    image = inputs[image_name]
    views = (image, model.get_layer(ROTATED_VIEW)(image) if has_rotated_view(model) else image)
    means = _feature_map_means(members[0])
    first = keras.Model(members[0].inputs, [members[0].outputs[0], *([] if means is None else [means])])
    embeddings, extra = [], []
    for index, member in enumerate(members):
        fed = {image_name: views[index % 2], feature_name: inputs[feature_name]}
        args = [fed[tensor.name.split(":")[0]] for tensor in member.inputs]
        if index == 0:
            outputs = first(args)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            embeddings.append(outputs[0])
            extra = list(outputs[1:])
        else:
            embeddings.append(member(args))
    embedding = model.get_layer(EMBEDDING_OUTPUT)(embeddings)  # training.ensemble's concatenation layer
    return keras.Model(inputs, [final_layer(model)(embedding), embedding, *extra])


class KerasBackend:
    """The Keras model as saved (TensorFlow on CPU here; JAX or TensorFlow on a GPU)."""

    name = "keras"

    def __init__(self, model_path: Path, threads: int | None = None, inter_op_threads: int | None = None) -> None:
        self.threads = threads or data_loader.available_cpus()
        _configure_tensorflow_threads(self.threads, inter_op_threads)
        self.artifact = model_path
        model = load_keras_model(model_path)
        self._image_input, self._feature_input, self.channels = describe_inputs(model, model_path)
        self.n_outputs = int(model.outputs[0].shape[-1])
        self.outputs_probabilities = ends_in_softmax(model)
        self.tta_views = tta_view_count(model)
        self._model = forward_model(model)
        self.has_layer_means = len(self._model.outputs) == 3

    def forward(self, images: np.ndarray, features: np.ndarray, tta: bool) -> Outputs:
        views = tta_views(images, self.tta_views if tta else 1)
        # every view of every file in one pass: (B * V, H, W, C), file-major
        stacked = np.stack(views, axis=1).reshape(-1, *images.shape[1:])[..., None]
        if self.channels == 3:
            stacked = np.repeat(stacked, 3, axis=-1)
        outputs = self._model.predict_on_batch({self._image_input: stacked,
                                                self._feature_input: np.repeat(features, len(views), 0)})
        scores, embedding, *means = (np.asarray(o).reshape(len(images), len(views), -1) for o in outputs)
        return scores, embedding, means[0] if means else None


class LiteRTBackend:
    """The exported ``.tflite`` on LiteRT's CPU interpreter (XNNPACK): no TensorFlow in the process.

    One file per interpreter run, its views written straight into the input buffer: measured on 2 cores, runs of
    4 images are faster than runs of 128 (2,000-2,700 vs 1,560 images/s: the activations stay in cache) and need
    160 MB instead of 610 MB of arena, and writing the views in place saves stacking the batch (11 of 66 ms per
    32 files with TTA).
    """

    name = "litert"

    def __init__(self, tflite_path: Path, threads: int | None = None, tta_views: int = FULL_TTA_VIEWS) -> None:
        """``tta_views``: the Keras model's :func:`tta_view_count`, which the thresholds file records (a LiteRT
        model does not say)."""
        if not installed("ai_edge_litert"):
            raise ArtifactError(f"{tflite_path}: the LiteRT runtime is not installed: {LITE_INSTALL}")
        from ai_edge_litert.interpreter import Interpreter

        self.artifact = tflite_path
        self.threads = threads or data_loader.available_cpus()
        self.tta_views = tta_views
        try:
            self._interpreter = Interpreter(model_path=str(tflite_path), num_threads=self.threads)
            runner = self._interpreter.get_signature_runner(SIGNATURE)
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{tflite_path}: cannot load LiteRT model: {exc}") from exc
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
        del runner  # it holds the interpreter's buffers, which would block resizing them
        scores = set(outputs) - {EMBEDDING_OUTPUT, LAYER_MEANS_OUTPUT}  # an export made before the layer gate: 2
        if set(inputs) != {IMAGE_INPUT, FEATURE_INPUT} or EMBEDDING_OUTPUT not in outputs or len(scores) != 1:
            raise ArtifactError(f"{tflite_path}: not an export of this tool (inputs {sorted(inputs)}, outputs "
                                f"{sorted(outputs)}); make it with `inference-runner export`")
        self.channels = check_input_shapes(tflite_path, tuple(inputs[IMAGE_INPUT]["shape_signature"]),
                                           tuple(inputs[FEATURE_INPUT]["shape_signature"]))
        score_output = scores.pop()
        self.outputs_probabilities = score_output == "probabilities"
        self.n_outputs = int(outputs[score_output]["shape_signature"][-1])
        self._image, self._features = inputs[IMAGE_INPUT]["index"], inputs[FEATURE_INPUT]["index"]
        self._scores, self._embedding = outputs[score_output]["index"], outputs[EMBEDDING_OUTPUT]["index"]
        self.has_layer_means = LAYER_MEANS_OUTPUT in outputs
        self._means = outputs[LAYER_MEANS_OUTPUT]["index"] if self.has_layer_means else None
        self._views = 0  # the batch dimension the interpreter is allocated for
        size = data_loader.IMAGE_SIZE
        with stderr_silenced(_quiet()):  # the XNNPACK delegate announces itself on the first run
            self.forward(np.zeros((1, size, size), np.float32), np.zeros((1, data_loader.N_FEATURES), np.float32),
                         tta=False)

    def _allocate(self, views: int) -> None:
        if views != self._views:
            size = data_loader.IMAGE_SIZE
            self._interpreter.resize_tensor_input(self._image, [views, size, size, self.channels])
            self._interpreter.resize_tensor_input(self._features, [views, data_loader.N_FEATURES])
            self._interpreter.allocate_tensors()
            self._views = views

    def forward(self, images: np.ndarray, features: np.ndarray, tta: bool) -> Outputs:
        views = tta_views(images, self.tta_views if tta else 1)
        self._allocate(len(views))
        scores, embeddings, means = [], [], []
        for index in range(len(images)):
            image_buffer = self._interpreter.tensor(self._image)()  # a view on the input: no copy of the batch
            for slot, view in enumerate(views):
                image_buffer[slot] = view[index][..., None]  # a grey plane fills every channel
            del image_buffer  # the interpreter refuses to run while a view on its memory is alive
            self._interpreter.set_tensor(self._features, np.repeat(features[index:index + 1], len(views), 0))
            self._interpreter.invoke()
            scores.append(self._interpreter.get_tensor(self._scores))
            embeddings.append(self._interpreter.get_tensor(self._embedding))
            if self._means is not None:
                means.append(self._interpreter.get_tensor(self._means))
        return np.stack(scores), np.stack(embeddings), np.stack(means) if means else None


def _is_patch_convolution(layer: Any, conv_class: type) -> bool:
    """A plain convolution whose kernel tiles its input without overlap (kernel size == stride, no padding)."""
    return (type(layer) is conv_class and layer.data_format == "channels_last" and layer.groups == 1
            and layer.padding == "valid" and tuple(layer.dilation_rate) == (1, 1)
            and tuple(layer.kernel_size) == tuple(layer.strides) and layer.kernel_size[0] == layer.kernel_size[1])


def with_space_to_depth_stems(model: Any) -> Any:
    """A copy of ``model`` in which each k x k convolution of stride k (the stem) runs as space-to-depth (k x k
    pixel blocks to channels) and a 1 x 1 convolution with the same weights: the same sums, which XNNPACK runs
    as a matrix product instead of a convolution over one input channel (measured on the shipped model with TTA:
    the whole model 1.09-1.20x as fast with the space-to-depth as a transpose, then 1.04-1.05x with the op). The
    model itself when it cannot be cloned."""
    keras = import_keras()
    from keras import ops

    def space_to_depth(x: Any, k: int) -> Any:
        # channel order (block row, block column, input channel): a (k, k, C, F) kernel's row-major order
        if hasattr(ops, "space_to_depth"):  # Keras >= 3.14: one SPACE_TO_DEPTH op, 3x faster than the transpose
            return ops.space_to_depth(x, k)
        _, height, width, channels = x.shape
        blocks = ops.transpose(ops.reshape(x, (-1, height // k, k, width // k, k, channels)), (0, 1, 3, 2, 4, 5))
        return ops.reshape(blocks, (-1, height // k, width // k, k * k * channels))

    class SpaceToDepthConv(keras.layers.Layer):
        def __init__(self, conv: Any) -> None:
            super().__init__(name=conv.name, dtype=conv.dtype_policy)
            self.block, self.filters = conv.kernel_size[0], conv.filters
            self.use_bias, self.activation = conv.use_bias, conv.activation

        def build(self, input_shape: tuple) -> None:
            depth = self.block * self.block * input_shape[-1]
            self.kernel = self.add_weight(shape=(1, 1, depth, self.filters), name="kernel")
            self.bias = self.add_weight(shape=(self.filters,), name="bias") if self.use_bias else None

        def call(self, x: Any) -> Any:
            y = ops.conv(space_to_depth(x, self.block), self.kernel, strides=1, padding="valid")
            return self.activation(y if self.bias is None else y + self.bias)

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            return (input_shape[0], input_shape[1] // self.block, input_shape[2] // self.block, self.filters)

    def clone(layer: Any) -> Any:
        if _is_patch_convolution(layer, keras.layers.Conv2D):
            return SpaceToDepthConv(layer)
        return layer.__class__.from_config(layer.get_config())

    try:
        rewritten = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:  # a model of a shape clone_model does not take: export it as it is
        logger.debug("%s: exported without the space-to-depth rewrite: %s", model.name, exc)
        return model
    if len(rewritten.weights) != len(model.weights):
        return model
    for source, target in zip(model.weights, rewritten.weights):
        if int(np.prod(source.shape)) != int(np.prod(target.shape)):
            return model
        # a (k, k, C, F) kernel read in row-major order is the (1, 1, k*k*C, F) kernel of the blocks' channels
        target.assign(np.reshape(np.asarray(source), target.shape))
    return rewritten


def export_litert(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str] | None = None) -> Path:
    """Convert a Keras model of this tool to LiteRT (float32, dynamic batch) next to it; returns the path.

    The export runs the same forward model the Keras backend runs (its stems as space-to-depth: the same sums,
    :func:`with_space_to_depth_stems`): inputs ``image`` and ``features``, outputs ``logits`` (or ``probabilities``
    for a softmax head) and ``embedding``. Needs TensorFlow.
    """
    model_path = Path(model_path)
    output = Path(output_path) if output_path else litert_path_for(model_path)
    require_full_install("exporting to LiteRT")
    keras = import_keras()
    import tensorflow as tf

    model = load_keras_model(model_path)
    image_name, feature_name, channels = describe_inputs(model, model_path)
    forward = forward_model(with_space_to_depth_stems(model))
    score_name = "probabilities" if ends_in_softmax(model) else "logits"

    def serve(image: Any, features: Any) -> dict[str, Any]:
        scores, embedding, *means = forward({image_name: image, feature_name: features}, training=False)
        return {score_name: scores, EMBEDDING_OUTPUT: embedding, **dict(zip([LAYER_MEANS_OUTPUT], means))}

    archive = keras.export.ExportArchive()
    archive.track(forward)
    size = data_loader.IMAGE_SIZE
    archive.add_endpoint(SIGNATURE, serve, input_signature=[
        keras.InputSpec(shape=(None, size, size, channels), dtype="float32", name=IMAGE_INPUT),
        keras.InputSpec(shape=(None, data_loader.N_FEATURES), dtype="float32", name=FEATURE_INPUT)])
    with tempfile.TemporaryDirectory(prefix="litert-export-") as saved_model, stderr_silenced(_quiet()):
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[SIGNATURE])
        flatbuffer = converter.convert()
    with atomic_path(output) as temp:
        temp.write_bytes(flatbuffer)
    logger.info("exported %s -> %s (%d bytes)", model_path.name, output, len(flatbuffer))
    return output


PIN_TOLERANCE = 1e-3  # largest |difference| of any output between a model and an export that may be pinned


def export_difference(keras_model: KerasBackend, export: Path, n_probes: int = 4, seed: int = 0) -> float:
    """Largest absolute difference between the Keras model's and its LiteRT export's outputs on seeded probe
    inputs (uniform images, normal features): a stale or broken export shows here."""
    lite = LiteRTBackend(export, threads=1, tta_views=keras_model.tta_views)
    if (keras_model.channels, keras_model.n_outputs) != (lite.channels, lite.n_outputs):
        return float("inf")
    rng = np.random.default_rng(seed)
    images = rng.random((n_probes, data_loader.IMAGE_SIZE, data_loader.IMAGE_SIZE), dtype=np.float32)
    features = rng.standard_normal((n_probes, data_loader.N_FEATURES)).astype(np.float32)
    if keras_model.has_layer_means != lite.has_layer_means:
        return float("inf")
    pairs = zip(keras_model.forward(images, features, True), lite.forward(images, features, True))
    return float(max(np.abs(np.asarray(a, np.float64) - b).max() for a, b in pairs if a is not None))


def litert_pin(model_path: str | os.PathLike[str], keras_model: KerasBackend | None = None) -> dict[str, str]:
    """The thresholds-file entries that pin the LiteRT export next to a Keras model ({} when there is none),
    after checking that it computes what the model computes. ``keras_model``: that model already loaded (the
    calibrating service's), so it is not loaded again."""
    model_path = Path(model_path)
    export = litert_path_for(model_path)
    if not export.is_file():
        return {}
    difference = export_difference(keras_model or KerasBackend(model_path), export)
    if not difference <= PIN_TOLERANCE:
        raise ArtifactError(f"{export}: outputs differ from {model_path.name}'s by {difference:.3g} on probe inputs "
                            f"(an export of another model?); re-export it with `inference-runner export`")
    logger.info("%s matches %s within %.2g; pinned", export.name, model_path.name, difference)
    return {"litert_file": export.name, "litert_sha256": sha256_of(export)}

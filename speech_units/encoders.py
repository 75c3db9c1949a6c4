"""Encoders: audio -> discrete speech units. `hubert` (transformers HubertModel, a layer's output)
and `mfcc` / `logmel` (speech_units.features) give frames that k-means centroids turn into units;
`mimi` and `speechtokenizer` are codecs with their own first codebook. `make_encoder` builds one
from the command line; `encode_audios` encodes long audio in pieces with context around each, so
that an utterance's units do not depend on what it is batched or cut with.

Each encoder takes a batch of mono arrays at `sampling_rate` (whole utterances, or pieces of long
ones) and gives `frames(n)` frames for each: k-means encoders their `features`, codecs their DSUs
(`encode`)."""

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.tokenizer import MAX_DSUS
from speech_units import features
from speech_units.inputs import InputError, json_object, readable

AUDIO_EXTRA = "pip install -r requirements-audio.txt"
CONTEXT_SECONDS = 10.0  # audio encoded on each side of a chunk, then dropped, for models that see their whole input


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InputError(f"this encoder needs the transformers package: {AUDIO_EXTRA}") from None
    transformers.utils.logging.disable_progress_bar()  # ours is the one that counts utterances
    return transformers


def torch_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device here")
    return torch.device(name)


@contextmanager
def _exact_float32(torch):
    """Float32 without TF32 inside, whatever the process set: TF32's 10-bit mantissa rounds
    differently for each batch shape (cuDNN uses it for convolutions by default), which on a GPU
    changed units of Mimi with their batch companions."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assign(x, centroids: np.ndarray, device=None) -> np.ndarray:
    """Nearest centroid of each row of `x` in float64: numpy on a CPU (features.assign, which made
    the bundled corpus), torch on a GPU."""
    if device is None or device.type == "cpu":
        return features.assign(np.asarray(x, dtype=np.float64), centroids)
    import torch

    if _DEVICE_CENTROIDS.get("array") is not centroids or _DEVICE_CENTROIDS["device"] != device:
        c = torch.as_tensor(centroids, device=device, dtype=torch.float64)  # once, not once per batch
        _DEVICE_CENTROIDS.update(array=centroids, device=device, c=c, norms=(c * c).sum(1))
    c, norms = _DEVICE_CENTROIDS["c"], _DEVICE_CENTROIDS["norms"]
    x = torch.as_tensor(x, device=device).double()
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + norms).argmin(1).cpu().numpy()


_DEVICE_CENTROIDS: dict = {}


class Encoder:
    name = ""
    sampling_rate = 16000
    downsampling_ratio = 320
    n_dsus = 0
    batch_size = 1
    chunked = True  # long audio may be encoded in pieces
    chunk_overlap = 0  # samples a frame reaches past its hop (the receptive field minus the hop)
    context = (0, 0)  # samples encoded before and after a piece's own frames, then dropped
    centroids = None

    def frames(self, n_samples: int) -> int:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def prepare(self, audio: np.ndarray) -> np.ndarray:
        """What is done to a whole utterance before it is cut into pieces."""
        return audio

    def features(self, audios: list[np.ndarray]) -> list:
        raise NotImplementedError(f"the {self.name} encoder has its own codebook")

    def encode(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError(f"the {self.name} encoder's units are k-means clusters of its features")

    def set_centroids(self, path: str, allow_pickle: bool, dim: int, settings: dict | None = None) -> None:
        if not path:
            raise InputError(f"the {self.name} encoder needs --kmeans (learn one with 'learn-kmeans')")
        self.centroids = features.load_centroids(path, allow_pickle, settings, dim)  # settings: .npz files only
        if len(self.centroids) > MAX_DSUS:
            raise InputError(f"{path}: {len(self.centroids)} centroids, more than the {MAX_DSUS} DSUs a tokenizer can hold")
        self.n_dsus = len(self.centroids)


class SpectralEncoder(Encoder):
    """MFCC or log-mel frames (speech_units.features) and k-means: the bundled corpus's units. `stack`
    consecutive 20 ms frames join into one vector before k-means, so a unit spans `stack` frames:
    50 / stack units per second (2: 25 Hz; 4: 12.5 Hz, Mimi's rate). A trailing part-unit is dropped.
    Each utterance is computed on its own, and never in pieces (its features are normalised over it)."""

    chunked = False

    def __init__(self, kind: str, kmeans: str | None, allow_pickle: bool = False, stack: int = 1):
        if stack < 1:
            raise InputError(f"--stack must be >= 1, got {stack}")
        self.name = kind
        self.stack = stack
        self.downsampling_ratio = features.HOP_LENGTH * stack
        self.extract = features.mfcc_features if kind == "mfcc" else features.logmel_features
        self.feature_settings = features.FEATURE_SETTINGS if kind == "mfcc" else features.LOGMEL_SETTINGS
        self.dim = stack * (features.FEATURE_DIM if kind == "mfcc" else features.LOGMEL_DIM)
        if kmeans is not None:
            self.set_centroids(kmeans, allow_pickle, self.dim, self.feature_settings)

    def frames(self, n_samples: int) -> int:
        return features.frame_count(n_samples) // self.stack

    def settings(self) -> dict:
        return {"features": self.feature_settings, "stack": self.stack}

    def features(self, audios):
        out = []
        for audio in audios:
            x = self.extract(audio)
            n = len(x) // self.stack
            out.append(x[: n * self.stack].reshape(n, self.dim))
        return out


class HubertEncoder(Encoder):
    """transformers HubertModel cut after transformer layer `layer` (fairseq's output_layer, 1-based:
    no final layer norm), then k-means. Padding is masked out of the attention and its frames are
    never used, so batched utterances get their features alone (up to float rounding). Attention
    sees the whole input, so a piece of a long file is encoded with CONTEXT_SECONDS around it."""

    name = "hubert"

    def __init__(self, model_dir: str, layer: int, kmeans: str | None, device: str, batch_size: int,
                 allow_pickle: bool = False):
        transformers = _transformers()
        import torch

        self.model_dir = _model_dir(model_dir)
        self.device = torch_device(device)
        model = transformers.HubertModel.from_pretrained(str(self.model_dir), local_files_only=True)
        n_layers = model.config.num_hidden_layers
        if not 1 <= layer <= n_layers:
            raise InputError(f"--layer {layer}: {model_dir} has transformer layers 1..{n_layers}")
        self.layer = layer
        model.encoder.layers = model.encoder.layers[:layer]  # the layers above are never needed
        self._captured = []
        model.encoder.layers[-1].register_forward_hook(
            lambda _m, _i, out: self._captured.append(out[0] if isinstance(out, tuple) else out))
        self.model = model.eval().to(self.device)
        self.torch = torch
        pre = json_object(self.model_dir / "preprocessor_config.json", required=False)
        # HuBERT large was trained on utterance-normalised audio, base on raw audio (fairseq's
        # task.normalize); the Hugging Face preprocessor config says which.
        self.normalize = pre.get("do_normalize", model.config.feat_extract_norm == "layer")
        self.sampling_rate = pre.get("sampling_rate", 16000)
        where = self.model_dir / "preprocessor_config.json"
        if not isinstance(self.normalize, bool):
            raise InputError(f"{where}: field 'do_normalize': expected true or false, got {self.normalize!r}")
        if not _positive_int(self.sampling_rate):
            raise InputError(f"{where}: field 'sampling_rate': expected a positive integer, got {self.sampling_rate!r}")
        self.downsampling_ratio = int(np.prod(model.config.conv_stride))
        receptive = 1
        for kernel, stride in reversed(list(zip(model.config.conv_kernel, model.config.conv_stride))):
            receptive = (receptive - 1) * stride + kernel
        self.receptive_field = receptive
        self.chunk_overlap = receptive - self.downsampling_ratio
        self.context = (int(CONTEXT_SECONDS * self.sampling_rate),) * 2
        # Group norm (HuBERT base) normalises over time, padding included: batch only on layer norm.
        self.batch_size = batch_size if model.config.feat_extract_norm == "layer" else 1
        if kmeans is not None:
            self.set_centroids(kmeans, allow_pickle, model.config.hidden_size)

    def frames(self, n_samples: int) -> int:
        return 0 if n_samples < self.receptive_field else 1 + (n_samples - self.receptive_field) // self.downsampling_ratio

    def settings(self) -> dict:
        return {"model": str(self.model_dir), "model_sha256": _model_hash(self.model_dir), "layer": self.layer,
                "normalize": self.normalize}

    def prepare(self, audio):
        # Over the whole utterance, as Wav2Vec2FeatureExtractor does, so that its pieces share it.
        return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7) if self.normalize else audio

    def features(self, audios):
        torch = self.torch
        lengths = [len(a) for a in audios]
        batch = np.zeros((len(audios), max(lengths)), np.float32)
        mask = np.zeros(batch.shape, np.int64)
        for i, a in enumerate(audios):
            batch[i, : len(a)], mask[i, : len(a)] = a, 1
        self._captured.clear()
        with torch.inference_mode(), _exact_float32(torch):
            self.model(torch.from_numpy(batch).to(self.device),
                       attention_mask=torch.from_numpy(mask).to(self.device) if len(audios) > 1 else None)
        hidden = self._captured[0]
        return [hidden[i, : self.frames(n)].float() for i, n in enumerate(lengths)]


class CodecEncoder(Encoder):
    """A neural codec's first codebook: one frame per started hop of audio."""

    model_dir: Path

    def frames(self, n_samples: int) -> int:
        return -(-n_samples // self.downsampling_ratio)

    def settings(self) -> dict:
        return {"model": str(self.model_dir), "model_sha256": _model_hash(self.model_dir), "codebook": 0}


class MimiEncoder(CodecEncoder):
    """transformers MimiModel, the first (semantic) codebook of its split RVQ.

    Mimi is causal, so padding after an utterance cannot reach its full frames, but it reaches the
    last, part-filled one: alone, each strided convolution pads its input to a whole window with
    zeros (or its last frame repeated), while in a batch the encoding of the padding audio fills
    that window. Hooks on those convolutions give each utterance of a batch the padding it gets
    alone, so its codes do not depend on its companions (up to float rounding). Its reach back is
    finite (the convolutions and the transformer's attention window), so a chunk of a long file
    encoded with that much audio before it gets exactly the frames of a single pass."""

    name = "mimi"

    def __init__(self, model_dir: str, device: str, batch_size: int):
        transformers = _transformers()
        import torch
        from transformers.models.mimi.modeling_mimi import MimiConv1d

        self.model_dir = _model_dir(model_dir)
        self.device = torch_device(device)
        self.model = transformers.MimiModel.from_pretrained(str(self.model_dir), local_files_only=True).eval().to(self.device)
        config = self.model.config
        self.sampling_rate = int(config.sampling_rate)
        self.downsampling_ratio = int(round(config.sampling_rate / config.frame_rate))
        self.n_dsus = int(config.codebook_size)
        self.torch = torch
        # Where this transformers version keeps them: in MimiModel.encoder, or beside it.
        seanet = getattr(self.model.encoder, "encoder_seanet", self.model.encoder)
        downsample = getattr(self.model.encoder, "downsample", None) or getattr(self.model, "downsample", None)
        convs = [m for m in [*seanet.modules(), downsample] if isinstance(m, MimiConv1d)]
        strided = [m for m in convs if m.conv.stride[0] > 1]
        causal = config.use_causal_conv and all(m.pad_mode in ("constant", "replicate") for m in strided)
        window = getattr(config, "sliding_window", None)
        # Unless every layer looks only back, padding reaches every frame: then one utterance at a time.
        self.batch_size = batch_size if causal else 1
        self._valid: dict[int, list[int]] = {}  # input length at a layer -> each utterance's own length there
        if causal:
            for conv in strided:
                conv.register_forward_pre_hook(self._pad_as_alone)
                conv.register_forward_hook(self._record_lengths)
        context = int(CONTEXT_SECONDS * self.sampling_rate)
        self.context = (self._reach(convs, downsample, window), 0) if causal and window else (context, context)

    @staticmethod
    def _reach(convs: list, downsample, window: int) -> int:
        """Samples before a frame's hop that can change it: the receptive field of the convolutions
        (residual branches counted in series: a bound) and the transformer's attention window,
        which works between the SEANet and the downsampling convolution."""
        reach, jump = 0, 1
        for conv in convs:
            if conv is downsample:
                reach += (window - 1) * jump
            reach += (int(conv.kernel_size) - 1) * jump
            jump *= conv.conv.stride[0]
        return reach if downsample is not None else reach + (window - 1) * jump

    def _pad_as_alone(self, conv, args):
        x = args[0]
        valid = self._valid[x.shape[-1]]
        if min(valid) == x.shape[-1]:
            return None
        x = x.clone()
        for i, n in enumerate(valid):
            x[i, :, n:] = x[i, :, n - 1 : n] if conv.pad_mode == "replicate" else 0
        return (x, *args[1:])

    def _record_lengths(self, conv, args, out):
        stride = conv.conv.stride[0]
        self._valid[out.shape[-1]] = [-(-n // stride) for n in self._valid[args[0].shape[-1]]]

    def encode(self, audios):
        torch = self.torch
        lengths = [len(a) for a in audios]
        batch = np.zeros((len(audios), 1, max(lengths)), np.float32)
        for i, a in enumerate(audios):
            batch[i, 0, : len(a)] = a
        self._valid = {batch.shape[-1]: lengths}
        with torch.inference_mode(), _exact_float32(torch):
            codes = self.model.encode(torch.from_numpy(batch).to(self.device), num_quantizers=1).audio_codes
        return [codes[i, 0, : self.frames(n)].cpu().numpy().astype(np.int64) for i, n in enumerate(lengths)]


class SpeechTokenizerEncoder(CodecEncoder):
    """The speechtokenizer package's model, RVQ-0 codes. Its encoder is not causal (convolutions
    and a BiLSTM see the padding), so utterances go one at a time, and a piece of a long file is
    encoded with CONTEXT_SECONDS around it."""

    name = "speechtokenizer"

    def __init__(self, model_dir: str, device: str):
        try:
            from speechtokenizer import SpeechTokenizer
        except ImportError:
            raise InputError("the speechtokenizer encoder needs its package: pip install speechtokenizer") from None
        import torch

        self.model_dir = _model_dir(model_dir)
        config_path, weights = self.model_dir / "config.json", self.model_dir / "SpeechTokenizer.pt"
        if not weights.exists():
            raise InputError(f"{self.model_dir}: no {weights.name} (the directory holds config.json and SpeechTokenizer.pt)")
        config = json_object(config_path)
        for key in ("codebook_size", "sample_rate"):
            if not _positive_int(config.get(key)):
                raise InputError(f"{config_path}: field '{key}': expected a positive integer, got {config.get(key)!r}")
        self.n_dsus = config["codebook_size"]
        self.device = torch_device(device)
        self.model = SpeechTokenizer(config)
        # Read as data: the package's own loader would unpickle the checkpoint.
        self.model.load_state_dict(torch.load(readable(weights), map_location="cpu", weights_only=True))
        self.model = self.model.eval().to(self.device)
        self.sampling_rate = int(self.model.sample_rate)
        self.downsampling_ratio = int(self.model.downsample_rate)
        self.context = (int(CONTEXT_SECONDS * self.sampling_rate),) * 2
        self.torch = torch

    def encode(self, audios):
        out = []
        for a in audios:
            with self.torch.inference_mode(), _exact_float32(self.torch):
                codes = self.model.encode(self.torch.from_numpy(a)[None, None].to(self.device), n_q=1)
            out.append(codes[0, 0].cpu().numpy().astype(np.int64))
        return out


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _model_dir(model_dir: str | None) -> Path:
    if not model_dir:
        raise InputError("this encoder needs --model DIR (a local model directory)")
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise InputError(f"--model {model_dir}: no config.json there (a Hugging Face model directory is expected)")
    for entry in _model_files(path):
        readable(entry)  # a FIFO among them would block the model's loader
    return path


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".pt"))


def _model_hash(model_dir: Path) -> str:
    """sha256 over the directory's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in _model_files(model_dir):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()


def make_encoder(args, need_kmeans: bool = True) -> Encoder:
    kmeans = args.kmeans if need_kmeans else None
    allow = getattr(args, "allow_pickle", False)
    if args.encoder in ("mfcc", "logmel"):
        encoder = SpectralEncoder(args.encoder, kmeans, allow, args.stack)
        if need_kmeans and kmeans is None:
            raise InputError(f"the {args.encoder} encoder needs --kmeans (e.g. data/mini/kmeans.npz, or learn one with 'learn-kmeans')")
        return encoder
    if args.encoder == "hubert":
        if args.layer is None:
            raise InputError("the hubert encoder needs --layer (22 for HuBERT large, as the reference's datasets)")
        if need_kmeans and kmeans is None:
            raise InputError("the hubert encoder needs --kmeans (learn one with 'learn-kmeans')")
        return HubertEncoder(args.model, args.layer, kmeans, args.device, args.batch_size, allow)
    if args.kmeans and need_kmeans:
        raise InputError(f"--kmeans: the {args.encoder} encoder has its own codebook")
    if args.encoder == "mimi":
        return MimiEncoder(args.model, args.device, args.batch_size)
    return SpeechTokenizerEncoder(args.model, args.device)


# ---------------------------------------------------------------------------------------------
# Encoding, with long audio in pieces


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of an utterance, encoded as one; of its frames, `count` from `first`
    on are kept, the others being context. `start` is on a frame boundary, so the piece's frame j
    is the utterance's frame start / hop + j."""

    start: int
    stop: int
    first: int
    count: int


def chunk_pieces(n_samples: int, encoder: Encoder, chunk_seconds: float) -> list[Piece]:
    """The pieces an utterance is encoded in: its frames in chunks of `chunk_seconds`, each encoded
    with `encoder.context` samples of audio before and after it (the window moved inwards at the
    ends of the file, so every piece is as long, and chunks that end up in the same window share
    one piece), so that its frames see what a single pass shows them: exactly where the model's
    reach is finite (Mimi), nearly where it attends to its whole input (HuBERT)."""
    n_frames = encoder.frames(n_samples)
    hop = encoder.downsampling_ratio
    step = max(1, int(chunk_seconds * encoder.sampling_rate) // hop)
    if not encoder.chunked or n_frames <= step:
        return [Piece(0, n_samples, 0, n_frames)]
    before, after = (-(-c // hop) for c in encoder.context)  # whole frames
    window = before + step + after
    pieces = []
    for first in range(0, n_frames, step):
        last = min(n_frames, first + step)
        # Frames [first - before, first + step + after), moved inside the file where they cross its ends.
        start = max(0, min(first - before, n_frames - window))
        stop = min(n_frames, start + window)
        piece = Piece(start * hop, n_samples if stop == n_frames else stop * hop + encoder.chunk_overlap,
                      first - start, last - first)
        if pieces and (pieces[-1].start, pieces[-1].stop) == (piece.start, piece.stop):  # the same window: once
            before_it = pieces.pop()
            piece = Piece(piece.start, piece.stop, before_it.first, before_it.count + piece.count)
        pieces.append(piece)
    return pieces


def _in_pieces(encoder: Encoder, audios: list[np.ndarray], chunk_seconds: float, run) -> list[list]:
    """`run` (the encoder's `features` or `encode`) over the pieces of every audio, `batch_size`
    pieces at a time, longest first (less padding); per audio, the kept frames of its pieces in order."""
    audios = [encoder.prepare(a) for a in audios]
    pieces = [(i, p) for i, a in enumerate(audios) for p in chunk_pieces(len(a), encoder, chunk_seconds)]
    order = sorted(range(len(pieces)), key=lambda k: pieces[k][1].start - pieces[k][1].stop)
    kept = [None] * len(pieces)
    for first in range(0, len(order), encoder.batch_size):
        batch = order[first : first + encoder.batch_size]
        outputs = run([audios[pieces[k][0]][pieces[k][1].start : pieces[k][1].stop] for k in batch])
        for k, out in zip(batch, outputs):
            p = pieces[k][1]
            kept[k] = out[p.first : p.first + p.count]
    per_audio = [[] for _ in audios]
    for (i, _), frames in zip(pieces, kept):
        per_audio[i].append(frames)
    return per_audio


def utterance_features(encoder: Encoder, audios: list[np.ndarray], chunk_seconds: float,
                       names: list[str] | None = None) -> list:
    """Per audio, the (frames x dims) features a k-means encoder clusters: torch on the encoder's
    device, or numpy. Non-finite features are refused, naming the audio (`names`)."""
    out = []
    for i, parts in enumerate(_in_pieces(encoder, audios, chunk_seconds, encoder.features)):
        if hasattr(parts[0], "isfinite"):
            import torch

            whole, finite = torch.cat(parts), lambda x: bool(x.isfinite().all())
        else:
            whole, finite = np.concatenate(parts), lambda x: bool(np.isfinite(x).all())
        if not finite(whole):
            raise InputError(f"{names[i] if names else f'audio {i}'}: the {encoder.name} features hold NaN or "
                             "infinite values")
        out.append(whole)
    return out


def encode_audios(encoder: Encoder, audios: list[np.ndarray], chunk_seconds: float,
                  names: list[str] | None = None) -> list[np.ndarray]:
    """DSUs of each audio: the nearest centroid of each frame's features (k-means encoders) or the
    codec's codes; the same for an audio whatever it is batched with."""
    if encoder.centroids is not None:
        device = getattr(encoder, "device", None)
        return [assign(f, encoder.centroids, device) for f in utterance_features(encoder, audios, chunk_seconds, names)]
    return [np.concatenate(parts).astype(np.int64) for parts in _in_pieces(encoder, audios, chunk_seconds, encoder.encode)]


def as_numpy(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)

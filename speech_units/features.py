"""Audio features and k-means: the small DSP a speech tokenizer needs, and the k-means every
k-means encoder of `speech_units.encoders` (MFCC, log-mel, HuBERT) shares.

Audio -> MFCC (or log-mel) frames -> nearest k-means centroid per frame = discrete speech units (DSUs).

Frames: 16 kHz audio, 400-sample (25 ms) Hann windows every 320 samples (20 ms, 50 frames/s),
no padding, so `n_samples` samples give `1 + (n_samples - 400) // 320` frames (the same count as
HuBERT's convolutional front end). Frame i covers samples [320 i, 320 i + 400).

Per frame: 13 MFCCs (c0 included; pre-emphasis 0.97, 512-point FFT power spectrum, 40 HTK-mel
triangles from 20 Hz to 8 kHz, floored at FLOOR_DB below the utterance's loudest mel energy,
natural log, orthonormal DCT-II), mean/variance-normalised over the utterance (which takes out
loudness and much of the voice's spectral tilt), then stacked with the CONTEXT frames on each side
(edges repeated): 65 values covering 100 ms. The floor makes pauses and faint noise one steady
sound instead of a scatter of units (about 30% of all units, before it), and the stacked context
gives steadier, less voice-specific units than deltas did. There are no dataset-wide statistics
to save; `kmeans.npz` stores the centroids and these settings, and `load_centroids` refuses a file
whose settings differ from the code's.
"""

import hashlib
import io
import os
import zipfile
from functools import lru_cache
from math import gcd

import numpy as np

from files import NotRegularFile, regular_file

SAMPLE_RATE = 16000
WIN_LENGTH = 400
HOP_LENGTH = 320
N_FFT = 512
N_MELS = 40
N_MFCC = 13
F_MIN = 20.0
F_MAX = 8000.0
PREEMPHASIS = 0.97
FLOOR_DB = 50.0
CONTEXT = 2
LOG_FLOOR = 1e-10  # absolute floor under FLOOR_DB, for all-zero audio

FEATURE_SETTINGS = {
    "sample_rate": SAMPLE_RATE,
    "win_length": WIN_LENGTH,
    "hop_length": HOP_LENGTH,
    "n_fft": N_FFT,
    "n_mels": N_MELS,
    "n_mfcc": N_MFCC,
    "f_min": F_MIN,
    "f_max": F_MAX,
    "preemphasis": PREEMPHASIS,
    "floor_db": FLOOR_DB,
    "context": CONTEXT,
    "normalisation": "utterance mean/variance of the MFCCs, before stacking",
}
FEATURE_DIM = (2 * CONTEXT + 1) * N_MFCC
# The log-mel variant: the same frames, floor and normalisation, without the DCT.
LOGMEL_SETTINGS = {**{k: v for k, v in FEATURE_SETTINGS.items() if k != "n_mfcc"},
                   "features": "log-mel", "normalisation": "utterance mean/variance of the log-mels, before stacking"}
LOGMEL_DIM = (2 * CONTEXT + 1) * N_MELS

ASSIGN_CHUNK = 32768  # frames per distance block: bounds memory at chunk x K doubles


class FeatureError(ValueError):
    pass


def frame_count(n_samples: int) -> int:
    """Frames (and DSUs) of `n_samples` samples at 16 kHz; 0 when shorter than one window."""
    return 0 if n_samples < WIN_LENGTH else 1 + (n_samples - WIN_LENGTH) // HOP_LENGTH


@lru_cache(maxsize=8)
def _sinc_kernels(sr_in: int, sr_out: int, zeros: int, rolloff: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap offsets and one Kaiser-windowed sinc kernel per output phase (phases repeat every
    sr_out / gcd(sr_in, sr_out) outputs), cutoff `rolloff` times the lower Nyquist frequency."""
    cutoff = rolloff * min(1.0, sr_out / sr_in)  # in cycles per input sample, times 2
    half = int(np.ceil(zeros / cutoff))
    taps = np.arange(-half + 1, half + 1)
    phases = np.arange(sr_out // gcd(sr_in, sr_out))
    frac = (phases * sr_in % sr_out) / sr_out  # output position minus its input sample to the left
    tau = frac[:, None] - taps[None, :]  # distance from each tap to the output position
    beta = 8.6  # Kaiser shape: about 90 dB stop-band attenuation
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (tau / half) ** 2, 0.0, None))) / np.i0(beta)
    return taps, cutoff * np.sinc(cutoff * tau) * window


def resample(audio: np.ndarray, sr_in: int, sr_out: int, zeros: int = 16, rolloff: float = 0.95) -> np.ndarray:
    """Band-limited (windowed-sinc, polyphase) resampling to len(audio) * sr_out // sr_in samples.

    Output sample n sits at input position n * sr_in / sr_out; `zeros` sinc zero crossings each side.
    """
    audio = np.asarray(audio, dtype=np.float64)
    if sr_in == sr_out:
        return audio.copy()
    taps, kernels = _sinc_kernels(sr_in, sr_out, zeros, rolloff)
    n_out = len(audio) * sr_out // sr_in
    padded = np.pad(audio, (len(taps), len(taps)))
    out = np.empty(n_out)
    chunk = max(1, 2_000_000 // len(taps))  # bound the (outputs x taps) work arrays
    for first in range(0, n_out, chunk):
        n = np.arange(first, min(n_out, first + chunk))
        around = padded[(n * sr_in // sr_out)[:, None] + taps[None, :] + len(taps)]
        out[first : first + len(n)] = np.einsum("ij,ij->i", around, kernels[n % len(kernels)])
    return out


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters, equally spaced on the HTK mel scale."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), N_MELS + 2))
    bins = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def dct_matrix() -> np.ndarray:
    """(N_MFCC, N_MELS) orthonormal DCT-II rows."""
    k = np.arange(N_MFCC)[:, None]
    n = np.arange(N_MELS)[None, :]
    basis = np.sqrt(2.0 / N_MELS) * np.cos(np.pi * k * (n + 0.5) / N_MELS)
    basis[0] /= np.sqrt(2.0)
    return basis


_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)  # periodic Hann
_MEL = mel_filterbank()
_DCT = dct_matrix()


def stack_context(x: np.ndarray) -> np.ndarray:
    """Row t becomes rows t - CONTEXT .. t + CONTEXT side by side (edges repeated)."""
    padded = np.pad(x, ((CONTEXT, CONTEXT), (0, 0)), mode="edge")
    return np.concatenate([padded[i : i + len(x)] for i in range(2 * CONTEXT + 1)], axis=1)


def _log_mel(audio: np.ndarray) -> np.ndarray:
    """(frames, N_MELS) natural-log mel energies, floored FLOOR_DB below the loudest."""
    audio = np.asarray(audio, dtype=np.float64)
    if frame_count(len(audio)) == 0:
        raise FeatureError(f"audio of {len(audio)} samples is shorter than one {WIN_LENGTH}-sample window")
    emphasised = np.append(audio[:1], audio[1:] - PREEMPHASIS * audio[:-1])
    frames = np.lib.stride_tricks.sliding_window_view(emphasised, WIN_LENGTH)[::HOP_LENGTH]
    mel = (np.abs(np.fft.rfft(frames * _HANN, n=N_FFT)) ** 2) @ _MEL.T
    floor = max(mel.max() * 10 ** (-FLOOR_DB / 10), LOG_FLOOR)
    return np.log(np.maximum(mel, floor))


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)


def mfcc_features(audio: np.ndarray) -> np.ndarray:
    """(frame_count(len(audio)), FEATURE_DIM) features of 16 kHz audio with samples in [-1, 1]."""
    return stack_context(_normalised(_log_mel(audio) @ _DCT.T))


def logmel_features(audio: np.ndarray) -> np.ndarray:
    """(frame_count(len(audio)), LOGMEL_DIM) stacked, normalised log-mel features (as MFCC, without the DCT)."""
    return stack_context(_normalised(_log_mel(audio)))


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return (x * x).sum(1)[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(1)[None, :]


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each row of `x` (ties: lowest index)."""
    labels = np.empty(len(x), dtype=np.int64)
    for first in range(0, len(x), ASSIGN_CHUNK):
        labels[first : first + ASSIGN_CHUNK] = _squared_distances(x[first : first + ASSIGN_CHUNK], centroids).argmin(1)
    return labels


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Initial centroids: each next one drawn with probability proportional to squared distance."""
    chosen = [int(rng.integers(len(x)))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = int(rng.choice(len(x), p=nearest / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(pick)
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    return x[chosen].copy()


def _check_points(x: np.ndarray, k: int) -> None:
    if len(x) < k:
        raise FeatureError(f"k-means needs at least k={k} frames, got {len(x)}")
    if not np.isfinite(x).all():  # one NaN frame would make every centroid NaN
        raise FeatureError(f"k-means input holds NaN or infinite values ({int((~np.isfinite(x)).any(1).sum())} "
                           f"of {len(x)} frames)")


def fit_kmeans(x: np.ndarray, k: int, seed: int, max_iter: int = 100, max_frames: int = 100_000) -> np.ndarray:
    """(k, dim) centroids from k-means++ then Lloyd iterations until no assignment changes.

    Deterministic given `seed`. At most `max_frames` rows (a seeded random subset) are used.
    A cluster left empty is moved onto the point farthest from its centroid.
    """
    x = np.asarray(x, dtype=np.float64)
    _check_points(x, k)
    rng = np.random.default_rng(seed)
    if len(x) > max_frames:
        x = x[np.sort(rng.choice(len(x), size=max_frames, replace=False))]
    centroids = _kmeans_plus_plus(x, k, rng)
    labels = None
    for _ in range(max_iter):
        new_labels = assign(x, centroids)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        for empty in np.flatnonzero(counts == 0):
            far = int(((x - centroids[labels]) ** 2).sum(1).argmax())
            sums[empty], counts[empty] = x[far], 1
            labels[far] = empty
        centroids = sums / counts[:, None]
    return centroids


def fit_kmeans_torch(x: np.ndarray, k: int, seed: int, max_iter: int = 100, tol: float = 1e-4,
                     device: str = "cpu", chunk: int = 8192) -> np.ndarray:
    """(k, dim) float32 centroids: k-means++ then Lloyd iterations, in float32 with torch (on a GPU
    when `device` is one), until the assignments stop changing or the inertia improves by less than
    `tol` (relative). `python -m speech_units learn-kmeans` uses it: float64 `fit_kmeans` (the corpus recipe)
    takes minutes per iteration at HuBERT sizes on a CPU. Deterministic given `seed` and device."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_points(x, k)
    generator = torch.Generator().manual_seed(seed)
    points = torch.as_tensor(x, device=device)
    norms = (points * points).sum(1)

    def nearest(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each point's nearest centroid and squared distance, a chunk of points at a time."""
        c_norms = (centroids * centroids).sum(1)
        labels, dists = [], []
        for first in range(0, len(points), chunk):
            d = norms[first : first + chunk, None] - 2 * points[first : first + chunk] @ centroids.T + c_norms
            best = d.min(1)
            labels.append(best.indices)
            dists.append(best.values.clamp_min(0))
        return torch.cat(labels), torch.cat(dists)

    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    d2 = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2.double().cpu()
        pick = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(len(points), (1,), generator=generator))
        chosen.append(pick)
        d2 = torch.minimum(d2, ((points - points[pick]) ** 2).sum(1))
    centroids = points[chosen].clone()

    labels, inertia = None, None
    for _ in range(max_iter):
        new_labels, dists = nearest(centroids)
        new_inertia = float(dists.double().sum())
        if labels is not None and (torch.equal(new_labels, labels) or inertia - new_inertia <= tol * inertia):
            break
        labels, inertia = new_labels, new_inertia
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # re-seed empty clusters on the points farthest from their centroid
            far = dists.topk(len(empty)).indices
            sums[empty], counts[empty] = points[far], 1
        centroids = sums / counts[:, None]
    return centroids.cpu().numpy()


def save_kmeans(path: str | os.PathLike, centroids: np.ndarray, settings: dict = FEATURE_SETTINGS) -> None:
    """An .npz of the centroids and feature `settings`. Written entry by entry with a fixed
    timestamp (np.savez stamps the current time), so that a rebuild gives the same bytes."""
    arrays = {"centroids": centroids, **{name: np.asarray(value) for name, value in settings.items()}}
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def _read_pickled_centroids(path: str | os.PathLike) -> np.ndarray:
    """Centroids of a pickled k-means: a scikit-learn (Mini)BatchKMeans, as fairseq's and
    textlesslib's learn_kmeans save with joblib, or a bare array. Runs the pickle's code: callers
    check the user allowed it."""
    try:
        import joblib  # comes with scikit-learn; reads plain pickles too
        loaded = joblib.load(path)
    except ImportError:
        import pickle
        with open(path, "rb") as f:
            loaded = pickle.load(f)
    except Exception as e:
        raise FeatureError(f"{path}: cannot read as a pickled k-means ({type(e).__name__}: {e})") from None
    centroids = getattr(loaded, "cluster_centers_", loaded)
    if not isinstance(centroids, np.ndarray):
        raise FeatureError(f"{path}: the pickle holds a {type(loaded).__name__} with no cluster_centers_ array")
    return centroids


def load_centroids(path: str | os.PathLike, allow_pickle: bool = False, settings: dict | None = None,
                   dim: int | None = None) -> np.ndarray:
    """(K, dim) float64 centroids from a `.npy`, a `.npz` (field `centroids`; when `settings` are
    given, the file's feature settings must all be there and equal them) or, only with
    `allow_pickle`, a pickled scikit-learn / fairseq k-means. The format is told by the file's
    first bytes, never by its name, so that a pickle renamed `.npy` is still refused."""
    try:
        with open(regular_file(path), "rb") as f:
            magic = f.read(6)
    except NotRegularFile as e:
        raise FeatureError(str(e)) from None
    except OSError as e:
        raise FeatureError(f"{path}: cannot read ({e.strerror})") from None
    if magic == b"\x93NUMPY":
        try:
            centroids = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise FeatureError(f"{path}: not a plain numeric .npy array ({e})") from None
    elif magic.startswith(b"PK\x03\x04"):
        try:
            with np.load(path, allow_pickle=False) as saved:
                stored = {name: saved[name] for name in saved.files}
        except (OSError, ValueError) as e:
            raise FeatureError(f"{path}: not a readable kmeans .npz file ({e})") from None
        for name, value in {"centroids": None, **(settings or {})}.items():
            if name not in stored:
                raise FeatureError(f"{path}: field '{name}' is missing")
            if value is not None and stored[name].item() != value:
                raise FeatureError(f"{path}: field '{name}' is {stored[name].item()!r}, this code computes {value!r}")
        centroids = stored["centroids"]
    elif not allow_pickle:
        raise FeatureError(
            f"{path}: not a .npy or .npz file; a pickled k-means (scikit-learn, fairseq) can run any code when "
            f"loaded, so it is read only with --allow-pickle. Convert it once, if you trust it: "
            f"python -m speech_units convert-kmeans {path} OUT.npy --allow-pickle")
    else:
        centroids = _read_pickled_centroids(path)
    if centroids.ndim != 2 or len(centroids) == 0 or centroids.dtype.kind not in "fiu":
        raise FeatureError(f"{path}: centroids have shape {centroids.shape} and dtype {centroids.dtype}, expected (K, dim) numbers")
    if dim is not None and centroids.shape[1] != dim:
        raise FeatureError(f"{path}: centroids have shape {centroids.shape}, expected (K, {dim}) for these features")
    if not np.isfinite(centroids).all():
        raise FeatureError(f"{path}: centroids hold NaN or infinite values")
    return centroids.astype(np.float64)


def centroids_sha256(centroids: np.ndarray) -> str:
    """A hash of the centroid values (float64, little-endian) and shape: the same k-means hashes
    alike whichever file format it came in."""
    digest = hashlib.sha256(repr(tuple(centroids.shape)).encode())
    digest.update(np.ascontiguousarray(centroids, dtype="<f8").tobytes())
    return digest.hexdigest()

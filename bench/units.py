"""Utterances per second of each speech_units encoder at realistic sizes, and its k-means against
scikit-learn's MiniBatchKMeans.

    python bench/units.py [--seconds 10] [--n 3] [--batch-size 1] [--device cpu] [--skip-kmeans]
    python bench/units.py --agreement [--device cuda]

Encoders (random weights, real shapes, saved with save_pretrained and loaded as a user's would be):
HuBERT large (24 layers, 1024 wide, cut after layer 22) with 5000 k-means centroids; Mimi (the
default MimiConfig: Kyutai's shapes), first codebook; the MFCC encoder with the bundled
128-centroid k-means; log-mel with 128 random centroids. Each encodes `--n` utterances of
`--seconds` seconds of noisy tones, `--batch-size` at a time, after one warm-up batch (the first
call of a shape pays for allocator and kernel set-up); the figure is utterances over wall time of
`encode_audios`, i.e. the model plus the nearest-centroid search, without file reading (measured
on its own: `read+resample`).

`--agreement`: how many units change with what the user did not choose, for HuBERT large (k-means
of 500 fitted on its own features) and Mimi (its first codebook set to latents of the audio: a new
model's codebooks are zeros, which give every frame unit 0), both at real shapes with random
weights: 16 utterances of 2-12 s at --batch-size 1 against 8; and two 70 s files in 30 s chunks
against one pass, with the encoder's context and without.

k-means: `features.fit_kmeans_torch` (what `learn-kmeans` runs) and scikit-learn MiniBatchKMeans
(batch 10000, as fairseq's HuBERT learn_kmeans; n_init 1) fit the same frames, a mixture of
Gaussians; each is scored by its inertia (mean squared distance to the nearest centroid) on
held-out frames of the same mixture.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_units import encoders, features, inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t * (1 + 0.1 * np.sin(3 * t)))
            + rng.normal(0, 0.03, len(t))).astype(np.float32)


def throughput(encoder, seconds: float, n: int) -> tuple[float, int]:
    warm_up = encoder.batch_size
    audios = [speech_like(seconds, encoder.sampling_rate, seed) for seed in range(n + warm_up)]
    encoders.encode_audios(encoder, audios[:warm_up], chunk_seconds=30)
    started = time.perf_counter()
    out = encoders.encode_audios(encoder, audios[warm_up:], chunk_seconds=30)
    elapsed = time.perf_counter() - started
    return n / elapsed, len(out[0])


def hubert_large(tmp: Path, device: str, batch_size: int = 1):
    from transformers import HubertConfig, HubertModel

    if not (tmp / "hubert-large").exists():
        torch.manual_seed(0)
        config = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
        HubertModel(config).save_pretrained(tmp / "hubert-large")
        np.save(tmp / "km5000.npy", np.random.default_rng(0).normal(size=(5000, 1024)).astype(np.float32))
    return encoders.HubertEncoder(str(tmp / "hubert-large"), 22, str(tmp / "km5000.npy"), device, batch_size)


def mimi(tmp: Path, device: str, batch_size: int = 1, spread: bool = False):
    """Mimi at Kyutai's shapes; `spread`: its first codebook set to latents of tones."""
    from transformers import MimiConfig, MimiModel

    path = tmp / ("mimi-spread" if spread else "mimi")
    if not path.exists():
        torch.manual_seed(0)
        model = MimiModel(MimiConfig()).eval()
        if spread:  # 2048 entries want 164 s of latents
            rvq = model.to(device).quantizer.semantic_residual_vector_quantizer
            tones = torch.from_numpy(np.concatenate([speech_like(0.3, 24000, seed) for seed in range(600)]))
            projected = []  # the latents as the first codebook sees them
            hook = rvq.input_proj.register_forward_hook(lambda _m, _i, out: projected.append(out))
            with torch.no_grad():
                model.encode(tones[None, None].to(device), num_quantizers=1)
                frames = projected[0][0].T
                rvq.layers[0].codebook.embed_sum.copy_(frames[torch.randperm(len(frames))[: model.config.codebook_size]])
            hook.remove()
        model.cpu().save_pretrained(path)
    return encoders.MimiEncoder(str(path), device, batch_size)


def read_speed(tmp: Path, seconds: float, n: int) -> float:
    import soundfile

    paths = []
    for i in range(n):
        paths.append(tmp / f"a{i}.flac")
        soundfile.write(paths[-1], speech_like(seconds, 44100, i), 44100)
    started = time.perf_counter()
    for path in paths:
        inputs.read_audio(path, 16000)
    return n / (time.perf_counter() - started)


def kmeans_comparison(n: int = 50_000, dim: int = 256, k: int = 256, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (2 * k, dim))

    def draw(m):
        return (means[rng.integers(len(means), size=m)] + rng.normal(0, 0.6, (m, dim))).astype(np.float32)

    train, held_out = draw(n), draw(20_000)

    def inertia(c):
        return float(_min_sq(held_out, c).mean())

    lines = [f"k-means: {n} frames x {dim} dims, k={k}, held-out inertia on 20000 frames (lower is better)"]
    started = time.perf_counter()
    ours = features.fit_kmeans_torch(train, k, seed=0)
    lines.append(f"  fit_kmeans_torch (k-means++ + Lloyd, float32): {time.perf_counter() - started:6.1f} s, "
                 f"inertia {inertia(ours):.2f}")
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError:
        return lines + ["  scikit-learn is not installed: no comparison (pip install scikit-learn)"]
    started = time.perf_counter()
    skl = MiniBatchKMeans(n_clusters=k, batch_size=10000, max_iter=100, n_init=1, random_state=0,
                          reassignment_ratio=0.0, max_no_improvement=100, tol=0.0).fit(train)
    lines.append(f"  scikit-learn MiniBatchKMeans (batch 10000):      {time.perf_counter() - started:6.1f} s, "
                 f"inertia {inertia(skl.cluster_centers_):.2f}")
    return lines


def _min_sq(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    x, c = x.astype(np.float64), c.astype(np.float64)
    return ((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)).min(1)


def agreement(tmp: Path, device: str) -> None:
    hubert = hubert_large(tmp, device, 8)
    long = [speech_like(70, 16000, 100 + seed) for seed in range(2)]
    x = np.concatenate([f.cpu().numpy() for f in encoders.utterance_features(hubert, long, chunk_seconds=100)])
    hubert.centroids = features.fit_kmeans_torch(x, 500, seed=0, device=str(hubert.device)).astype(np.float64)
    for encoder in (hubert, mimi(tmp, device, 8, spread=True)):
        rate = encoder.sampling_rate
        rng = np.random.default_rng(0)
        short = [speech_like(rng.uniform(2, 12), rate, seed) for seed in range(16)]
        batched = encoders.encode_audios(encoder, short, chunk_seconds=30)
        encoder.batch_size = 1
        alone = encoders.encode_audios(encoder, short, chunk_seconds=30)
        differ = sum(int((a != b).sum()) for a, b in zip(alone, batched))
        print(f"{encoder.name}: batch 8 against 1: {differ} of {sum(map(len, alone))} units differ", flush=True)
        long = [speech_like(70, rate, 100 + seed) for seed in range(2)]
        single = encoders.encode_audios(encoder, long, chunk_seconds=100)
        for context in (encoder.context, (0, 0)):
            encoder.context = context
            chunked = encoders.encode_audios(encoder, long, chunk_seconds=30)
            differ = sum(int((a != b).sum()) for a, b in zip(single, chunked))
            print(f"{encoder.name}: 30 s chunks with context {context[0] / rate:.2f} s before, {context[1] / rate:.2f} s "
                  f"after, against one pass: {differ} of {sum(map(len, single))} units differ", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    parser.add_argument("--n", type=int, default=3, help="utterances timed per encoder (after one warm-up batch)")
    parser.add_argument("--batch-size", type=int, default=1, help="utterances per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-kmeans", action="store_true")
    parser.add_argument("--agreement", action="store_true", help="measure batch and chunk agreement instead of speed")
    args = parser.parse_args()
    if args.agreement:
        with tempfile.TemporaryDirectory() as tmp:
            agreement(Path(tmp), args.device)
        return
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"device {args.device}; utterances of {args.seconds:g} s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'read+resample (44.1 kHz flac -> 16 kHz)':44s} {read_speed(tmp, args.seconds, 5):8.1f} utt/s")
        makers = {
            "mfcc, bundled k-means (128 x 65)": lambda: encoders.SpectralEncoder("mfcc", str(ROOT / "data/mini/kmeans.npz")),
            "logmel, k-means 128 x 200": lambda: _logmel(tmp),
            "hubert large, layer 22, k-means 5000": lambda: hubert_large(tmp, args.device, args.batch_size),
            "mimi (default config), codebook 0": lambda: mimi(tmp, args.device, args.batch_size),
        }
        for name, make in makers.items():
            started = time.perf_counter()
            encoder = make()
            built = time.perf_counter() - started
            rate, frames = throughput(encoder, args.seconds, args.n)
            print(f"{name:44s} {rate:8.2f} utt/s  ({rate * args.seconds:6.1f} s of audio per s; "
                  f"{frames} frames per utterance; {built:.0f} s to create and load)", flush=True)
            del encoder
    if not args.skip_kmeans:
        print("\n".join(kmeans_comparison()))


def _logmel(tmp: Path):
    path = tmp / "logmel.npy"
    np.save(path, np.random.default_rng(0).normal(size=(128, features.LOGMEL_DIM)))
    return encoders.SpectralEncoder("logmel", str(path))


if __name__ == "__main__":
    main()

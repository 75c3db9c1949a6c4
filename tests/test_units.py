"""speech_units: audio -> DSUs -> Parquet shards, with small random HubertModel and MimiModel
directories saved by save_pretrained (no downloaded weights)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

import train
from speech_units import corpus, encoders, features, inputs, shards
from speech_units.cli import main
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
HIDDEN, LAYER, K = 32, 2, tiny.N_DSUS
# A few distinct lengths: each new input shape costs the CPU convolutions a slow first call.
SECONDS = [1.0, 1.3, 0.7]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory) -> Path:
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(8,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)  # HuBERT large's layout, tiny
    path = tmp_path_factory.mktemp("models") / "hubert"
    HubertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mimi_dir(tmp_path_factory) -> Path:
    """A tiny MimiModel whose first codebook lies among its latents. A new model's codebooks are all
    zeros, so every frame would get unit 0 and no change of a frame could ever show in its unit."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    config = MimiConfig(hidden_size=32, num_filters=4, num_hidden_layers=1, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=16, codebook_size=64, codebook_dim=16,
                        num_quantizers=2, vector_quantization_hidden_dimension=16, upsample_groups=32)
    model = MimiModel(config).eval()
    tones = np.concatenate([noise(0.4, config.sampling_rate, seed) for seed in range(40)]).astype(np.float32)
    rvq = model.quantizer.semantic_residual_vector_quantizer
    projected = []  # the latents as the first codebook sees them
    hook = rvq.input_proj.register_forward_hook(lambda _m, _i, out: projected.append(out))
    with torch.no_grad():
        model.encode(torch.from_numpy(tones)[None, None], num_quantizers=1)
        frames = projected[0][0].T
        chosen = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))[: config.codebook_size]
        rvq.layers[0].codebook.embed_sum.copy_(frames[chosen])  # cluster_usage is 1: the entries are these frames
    hook.remove()
    path = tmp_path_factory.mktemp("models") / "mimi"
    model.save_pretrained(path)
    return path


def noise(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """Noisy tones, different for each seed."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 900) * t) + rng.normal(0, 0.05, len(t))
    return np.stack([wave] * channels, 1) if channels > 1 else wave


def clip(n_samples: int, rate: int, seed: int) -> np.ndarray:
    """`n_samples` of float32 noisy tones."""
    return noise(n_samples / rate + 1, rate, seed)[:n_samples].astype(np.float32)


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> SimpleNamespace:
    """12 utterances as wav and flac files at 16, 22.05 and 24 kHz (one in stereo), a JSONL manifest
    of them and a CTM of their (made-up) word times."""
    root = tmp_path_factory.mktemp("audio")
    rows, ctm = [], []
    for i, spoken in enumerate(tiny.rows(12, seed=5, prefix="utt")):
        rate, suffix = [(16000, ".wav"), (22050, ".flac"), (24000, ".wav")][i % 3]
        seconds = SECONDS[i % len(SECONDS)]
        soundfile.write(root / f"{spoken['id']}{suffix}", noise(seconds, rate, i, channels=2 if i == 4 else 1), rate)
        words = spoken["tokenized"][:3]
        rows.append({"id": spoken["id"], "path": f"{spoken['id']}{suffix}", "transcript": " ".join(words)})
        ctm += [f"{spoken['id']} 1 {0.05 + 0.2 * w:.2f} 0.15 {word}" for w, word in enumerate(words)]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "words.ctm").write_text("\n".join(ctm) + "\n")
    return SimpleNamespace(root=root, manifest=manifest, ctm=root / "words.ctm", rows=rows)


@pytest.fixture(scope="module")
def kmeans(hubert_dir, audio, tmp_path_factory) -> Path:
    """K centroids learnt on the tiny HuBERT's layer-2 features of the test audio."""
    out = tmp_path_factory.mktemp("kmeans") / "km.npy"
    assert main(["learn-kmeans", str(out), "--encoder", "hubert", "--model", str(hubert_dir), "--layer", str(LAYER),
                 "--k", str(K), "--device", "cpu", "--quiet", str(audio.manifest)]) == 0
    return out


def hubert_args(hubert_dir, kmeans, out, *inputs, extra=()):
    return ["encode", str(out), "--encoder", "hubert", "--model", str(hubert_dir), "--layer", str(LAYER),
            "--kmeans", str(kmeans), "--device", "cpu", "--quiet", *extra, *map(str, inputs)]


def shard_rows(out: Path) -> list[dict]:
    return [row for shard in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


@pytest.fixture(scope="module")
def encoded(hubert_dir, kmeans, audio, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "hubert"
    assert main(hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--shard-size", "5"])) == 0
    return out


# -- frame counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [400, 719, 720, 16000, 16321])
def test_hubert_gives_one_unit_per_320_samples_after_the_first_400(hubert_dir, n_samples):
    encoder = encoders.HubertEncoder(str(hubert_dir), LAYER, None, "cpu", 1)
    encoder.centroids = np.random.default_rng(0).normal(size=(K, HIDDEN))
    assert (encoder.sampling_rate, encoder.downsampling_ratio) == (16000, 320)  # 50 Hz
    dsus = encoders.encode_audios(encoder, [noise(n_samples / 16000, 16000, 0).astype(np.float32)], 30)[0]
    assert len(dsus) == 1 + (n_samples - 400) // 320


@pytest.mark.parametrize("n_samples", [1, 1919, 1920, 1921, 24000, 24001])
def test_mimi_gives_one_unit_per_1920_samples_begun(mimi_dir, n_samples):
    encoder = encoders.MimiEncoder(str(mimi_dir), "cpu", 1)
    assert (encoder.sampling_rate, encoder.downsampling_ratio, encoder.n_dsus) == (24000, 1920, 64)  # 12.5 Hz
    dsus = encoders.encode_audios(encoder, [np.random.default_rng(0).normal(0, 0.1, n_samples).astype(np.float32)], 30)[0]
    assert len(dsus) == -(-n_samples // 1920)
    assert dsus.min() >= 0 and dsus.max() < 64


def test_long_audio_is_cut_into_pieces_that_keep_every_frame_once(hubert_dir, mimi_dir):
    hubert = encoders.HubertEncoder(str(hubert_dir), LAYER, None, "cpu", 4)
    hubert.centroids = np.random.default_rng(0).normal(size=(K, HIDDEN))
    mimi = encoders.MimiEncoder(str(mimi_dir), "cpu", 4)
    for encoder in (hubert, mimi):
        hop = encoder.downsampling_ratio
        before, after = (-(-c // hop) for c in encoder.context)
        for seconds in (2.0, 7.3, 31.7):
            n = int(seconds * encoder.sampling_rate)
            n_frames = encoder.frames(n)
            pieces = encoders.chunk_pieces(n, encoder, chunk_seconds=2)
            kept = [p.start // hop + p.first + j for p in pieces for j in range(p.count)]
            assert kept == list(range(n_frames))
            for p in pieces:
                assert p.start % hop == 0 and encoder.frames(p.stop - p.start) >= p.first + p.count
                first, last = p.start // hop + p.first, p.start // hop + p.first + p.count
                # Context on each side of the kept frames, as much as the file has.
                assert p.first >= min(before, first)
                assert encoder.frames(p.stop - p.start) - p.first - p.count >= min(after, n_frames - last)
        # A file no longer than a chunk and its context is one piece; a longer one several.
        one_window = 2 * encoder.sampling_rate + (before + after) * hop
        assert [(p.start, p.stop) for p in encoders.chunk_pieces(one_window, encoder, chunk_seconds=2)] == [(0, one_window)]
        long = clip(int(31.7 * encoder.sampling_rate), encoder.sampling_rate, 3)
        assert len(encoders.chunk_pieces(len(long), encoder, chunk_seconds=2)) > 1
        chunked = encoders.encode_audios(encoder, [long], chunk_seconds=2)[0]
        assert len(chunked) == encoder.frames(len(long)) == len(encoders.encode_audios(encoder, [long], 60)[0])


def test_chunked_long_audio_agrees_with_a_single_pass(hubert_dir, kmeans, mimi_dir):
    """Four 70 s files, in 30 s chunks and in one pass. Mimi's reach back is finite (its convolutions
    and attention window), so with that much context every unit agrees; HuBERT attends to all of its
    input, so a chunk's frames differ slightly wherever they are, and a frame nearly equidistant
    from two centroids may flip: under 0.05% may differ."""
    hubert = encoders.HubertEncoder(str(hubert_dir), LAYER, str(kmeans), "cpu", 8)
    mimi = encoders.MimiEncoder(str(mimi_dir), "cpu", 8)
    for encoder, allowed in ((hubert, 0.0005), (mimi, 0)):
        differ = total = 0
        for seed in range(3, 7):
            audio = noise(70, encoder.sampling_rate, seed).astype(np.float32)
            assert len(encoders.chunk_pieces(len(audio), encoder, 30)) > 1
            single = encoders.encode_audios(encoder, [audio], chunk_seconds=100)[0]
            chunked = encoders.encode_audios(encoder, [audio], chunk_seconds=30)[0]
            differ, total = differ + int((single != chunked).sum()), total + len(single)
        print(f"{encoder.name}: {differ} of {total} units differ ({100 * differ / total:.3f}%)")
        assert differ <= allowed * total if allowed else differ == 0, (encoder.name, differ, total)


# -- batching -------------------------------------------------------------------------------------


def batch_encoders(kind: str, hubert_dir, kmeans, mimi_dir, tmp_path) -> tuple[encoders.Encoder, encoders.Encoder]:
    """The `kind` encoder twice: one pass per utterance, and 8 utterances a pass."""
    if kind == "hubert":
        return tuple(encoders.HubertEncoder(str(hubert_dir), LAYER, str(kmeans), "cpu", b) for b in (1, 8))
    if kind == "mimi":
        return tuple(encoders.MimiEncoder(str(mimi_dir), "cpu", b) for b in (1, 8))
    if kind == "speechtokenizer":
        model = str(speechtokenizer_dir(tmp_path))
        return tuple(encoders.SpeechTokenizerEncoder(model, "cpu") for _ in range(2))
    if kind == "mfcc":
        return tuple(encoders.SpectralEncoder("mfcc", str(MINI / "kmeans.npz")) for _ in range(2))
    x = features.logmel_features(noise(3, 16000, 0))
    np.save(tmp_path / "logmel.npy", features.fit_kmeans_torch(x, 16, seed=0))
    return tuple(encoders.SpectralEncoder("logmel", str(tmp_path / "logmel.npy")) for _ in range(2))


def speechtokenizer_dir(tmp_path) -> Path:
    """A tiny random SpeechTokenizer, saved as its releases are: config.json and SpeechTokenizer.pt."""
    from speechtokenizer import SpeechTokenizer

    config = {"n_filters": 4, "dimension": 16, "semantic_dimension": 16, "strides": [8, 5, 4, 2], "lstm_layers": 1,
              "bidirectional": True, "dilation_base": 2, "residual_kernel_size": 3, "n_residual_layers": 1,
              "activation": "ELU", "sample_rate": 16000, "n_q": 1, "codebook_size": 64}
    torch.manual_seed(0)
    path = tmp_path / "speechtokenizer"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.save(SpeechTokenizer(config).state_dict(), path / "SpeechTokenizer.pt")
    return path


@pytest.mark.parametrize("kind", ["hubert", "mimi", "mfcc", "logmel", "speechtokenizer"])
def test_units_do_not_depend_on_batch_companions(kind, hubert_dir, kmeans, mimi_dir, tmp_path):
    if kind == "speechtokenizer":
        pytest.importorskip("speechtokenizer")
    alone, batched = batch_encoders(kind, hubert_dir, kmeans, mimi_dir, tmp_path)
    rate, hop = alone.sampling_rate, alone.downsampling_ratio
    # On and off the frame grid (and on half of it: Mimi's 25 Hz stage), each with shorter and longer companions.
    lengths = [rate, rate + 1, 13 * hop, 13 * hop + hop // 2, 7 * hop + 5, 2 * rate + 333, rate // 2 + 77,
               3 * rate - 1, hop + 401, int(1.3 * rate)]
    audios = [clip(n, rate, seed) for seed, n in enumerate(lengths)]
    one_by_one = [encoders.encode_audios(alone, [a], 30)[0].tolist() for a in audios]
    for group in (range(10), range(5), range(5, 10), range(0, 10, 3)):  # batches of 8 and 2, 5, 5, 4
        assert [u.tolist() for u in encoders.encode_audios(batched, [audios[i] for i in group], 30)] == \
            [one_by_one[i] for i in group], list(group)


def test_batch_size_leaves_the_shards_alone(hubert_dir, kmeans, mimi_dir, audio, tmp_path):
    """The CLI's default --batch-size 8 and --batch-size 1 write the same shards (the 12 test files
    at 16, 22.05 and 24 kHz: their resampled lengths fall off Mimi's frame grid)."""
    for name, encoder in (("hubert", ["--encoder", "hubert", "--model", str(hubert_dir), "--layer", str(LAYER),
                                      "--kmeans", str(kmeans)]),
                          ("mimi", ["--encoder", "mimi", "--model", str(mimi_dir)])):
        for b in (1, 8):
            assert main(["encode", str(tmp_path / f"{name}{b}"), *encoder, "--device", "cpu", "--quiet",
                         "--batch-size", str(b), str(audio.manifest)]) == 0
        assert shard_bytes(tmp_path / f"{name}1") == shard_bytes(tmp_path / f"{name}8")


def test_every_file_gets_the_frames_of_its_resampled_length(encoded, audio):
    rows = shard_rows(encoded)
    assert [r["id"] for r in rows] == [r["id"] for r in audio.rows]
    for row, listed in zip(rows, audio.rows):
        info = soundfile.info(str(audio.root / listed["path"]))
        n_16k = round(info.frames * 16000 / info.samplerate)  # soxr's output length
        assert len(row["speech_tokens"]) == 1 + (n_16k - 400) // 320
        assert row["tokenized"] == row["transcript"].split() and "aligned_token_start_time" not in row


# -- k-means --------------------------------------------------------------------------------------


def brute_force(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1).argmin(1)


def test_hubert_units_are_the_nearest_centroid_of_the_layer_output(hubert_dir, kmeans):
    from transformers import HubertModel

    encoder = encoders.HubertEncoder(str(hubert_dir), LAYER, str(kmeans), "cpu", 1)
    audio = noise(1.0, 16000, 9).astype(np.float32)
    # The layer's output straight from transformers: hidden_states[LAYER] is transformer layer LAYER's output.
    model = HubertModel.from_pretrained(hubert_dir).eval()
    normalised = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    with torch.no_grad():
        hidden = model(torch.from_numpy(normalised)[None], output_hidden_states=True).hidden_states[LAYER][0].numpy()
    centroids = np.load(kmeans)
    assert np.array_equal(encoders.encode_audios(encoder, [audio], 30)[0], brute_force(hidden, centroids))


def test_mfcc_units_are_the_nearest_bundled_centroid():
    centroids = features.load_centroids(MINI / "kmeans.npz", settings=features.FEATURE_SETTINGS)
    audio = noise(1.5, 16000, 4)
    encoder = encoders.SpectralEncoder("mfcc", str(MINI / "kmeans.npz"))
    assert np.array_equal(encoders.encode_audios(encoder, [audio], 30)[0], brute_force(features.mfcc_features(audio), centroids))


def test_learnt_centroids_are_the_means_of_their_frames_and_repeat_with_the_seed():
    x = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
    centroids = features.fit_kmeans_torch(x, 12, seed=1, tol=0)
    labels = brute_force(x, centroids)
    for k in range(12):
        assert np.allclose(centroids[k], x[labels == k].mean(0), atol=1e-5)
    assert np.array_equal(centroids, features.fit_kmeans_torch(x, 12, seed=1, tol=0))
    assert not np.array_equal(centroids, features.fit_kmeans_torch(x, 12, seed=2, tol=0))


def test_learn_kmeans_writes_a_plain_npy(kmeans):
    centroids = np.load(kmeans, allow_pickle=False)
    assert centroids.shape == (K, HIDDEN) and np.isfinite(centroids).all()


# -- determinism and resume -----------------------------------------------------------------------


def test_the_same_audio_gives_the_same_units(hubert_dir, kmeans, mimi_dir, audio, encoded, tmp_path):
    again = tmp_path / "again"
    assert main(hubert_args(hubert_dir, kmeans, again, audio.manifest, extra=["--shard-size", "5"])) == 0
    assert shard_bytes(again) == shard_bytes(encoded)
    mimi = [["encode", str(tmp_path / f"mimi{i}"), "--encoder", "mimi", "--model", str(mimi_dir), "--device", "cpu",
             "--quiet", str(audio.manifest)] for i in range(2)]
    assert main(mimi[0]) == 0 and main(mimi[1]) == 0
    assert shard_bytes(tmp_path / "mimi0") == shard_bytes(tmp_path / "mimi1")
    # One utterance alone gives what it gave in a batch of others.
    alone = encoders.HubertEncoder(str(hubert_dir), LAYER, str(kmeans), "cpu", 1)
    first = audio.rows[0]
    wav = inputs.read_audio(audio.root / first["path"], 16000)
    assert encoders.encode_audios(alone, [wav], 30)[0].tolist() == shard_rows(encoded)[0]["speech_tokens"]


def test_resume_after_a_killed_run_gives_the_same_shards(hubert_dir, kmeans, audio, encoded, tmp_path):
    # The run is killed while it reads utterance 6's audio (made to wait there): shard 0
    # (utterances 0-4) is written, shard 1 is not.
    out = tmp_path / "killed"
    args = hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--shard-size", "5"])
    waiting = audio.rows[6]["path"]
    stall = ("import sys, time\nfrom speech_units import cli, inputs\nread = inputs.read_audio\n"
             f"inputs.read_audio = lambda path, rate: time.sleep(600) if path.name == {waiting!r} else read(path, rate)\n"
             f"sys.exit(cli.main({args!r}))\n")
    process = subprocess.Popen([sys.executable, "-c", stall], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "stderr", "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    first_shard = out / "data" / "train-00000-of-00003.parquet"
    deadline = time.time() + 120
    while not first_shard.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first_shard.exists() and process.poll() is None, (tmp_path / "stderr").read_text()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((out / "units.json").read_text())["complete"] is False
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == [first_shard.name]
    kept = first_shard.stat().st_mtime_ns

    assert main(args) == 2  # an existing directory is never taken over silently
    assert main([*args, "--resume"]) == 0
    assert first_shard.stat().st_mtime_ns == kept  # the finished shard was kept, not redone
    assert shard_bytes(out) == shard_bytes(encoded)
    assert json.loads((out / "units.json").read_text())["complete"] is True


def test_resume_refuses_another_encoding(hubert_dir, kmeans, audio, encoded, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(encoded, out)
    assert main([*hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--shard-size", "4"]), "--resume"]) == 2
    assert "shard_size" in capsys.readouterr().err
    # The batch size may change: the units do not depend on it.
    (out / "data" / "train-00002-of-00003.parquet").unlink()
    assert main([*hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--shard-size", "5", "--batch-size", "3"]),
                 "--resume"]) == 0
    assert shard_bytes(out) == shard_bytes(encoded)


# -- units.json and what trains on the shards -----------------------------------------------------


def test_units_json_records_the_encoding(encoded, kmeans):
    info = json.loads((encoded / "units.json").read_text())
    assert info["encoder"] == "hubert" and info["layer"] == LAYER and info["complete"] is True
    assert info["centroids_sha256"] == features.centroids_sha256(np.load(kmeans).astype(np.float64))
    assert (info["n_dsus"], info["sampling_rate"], info["downsampling_ratio"]) == (K, 16000, 320)
    assert (info["n_utterances"], info["n_shards"]) == (12, 3)
    assert sorted(p.name for p in (encoded / "data").iterdir()) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]


def train_args(model, out, run_dir, config, *extra):
    settings = shards.overrides_for(out)  # what `python -m speech_units overrides OUT` prints
    return [str(ROOT / "configs" / config), f"run_dir={run_dir}", f"model.path={model}", *settings,
            "train.max_steps=2", "train.save_steps=2", "train.eval_steps=2", "train.log_steps=1", *extra]


def test_shards_train_with_train_py(encoded, hubert_dir, kmeans, audio, tmp_path, capsys):
    model = tiny.extended_model(tmp_path, n_dsus=K)
    assert train.main(train_args(model, encoded, tmp_path / "sft", "tiny_sft.json")) == 0
    assert train.main(train_args(model, encoded, tmp_path / "concat", "tiny_cpt.json",
                                 "data.cpt.sequence_type=concatenated_dsu_txt")) == 0
    # Interleaved CPT needs word times: refused, saying so; with a CTM's times it trains.
    capsys.readouterr()
    assert train.main(train_args(model, encoded, tmp_path / "interleaved", "tiny_cpt.json")) == 2
    assert "interleaved CPT needs word times" in capsys.readouterr().err
    assert not (tmp_path / "interleaved").exists()
    timed = tmp_path / "timed"
    assert main(hubert_args(hubert_dir, kmeans, timed, audio.manifest, extra=["--alignments", str(audio.ctm)])) == 0
    row = shard_rows(timed)[0]
    assert row["aligned_token_start_time"] == [0.05, 0.25, 0.45][: len(row["tokenized"])]
    assert row["speech_tokens"] == shard_rows(encoded)[0]["speech_tokens"]
    assert train.main(train_args(model, timed, tmp_path / "interleaved2", "tiny_cpt.json")) == 0
    assert (tmp_path / "interleaved2" / "checkpoints" / "step_0000002" / "model.safetensors").exists()


# -- alignments -----------------------------------------------------------------------------------

LONG_TEXTGRID = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 1.2
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 1.2
        intervals: size = 4
        intervals [1]:
            xmin = 0
            xmax = 0.1
            text = ""
        intervals [2]:
            xmin = 0.1
            xmax = 0.52
            text = "say ""hi"""
        intervals [3]:
            xmin = 0.52
            xmax = 0.9
            text = "there"
        intervals [4]:
            xmin = 0.9
            xmax = 1.2
            text = ""
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 1.2
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 1.2
            text = "x"
'''
SHORT_TEXTGRID = '''"ooTextFile"
"TextGrid"
0
1.2
<exists>
1
"IntervalTier"
"anything"
0
1.2
3
0
0.1
""
0.1
0.52
"say ""hi"""
0.52
0.9
"there"
'''


@pytest.mark.parametrize("text", [LONG_TEXTGRID, SHORT_TEXTGRID], ids=["long", "short"])
def test_textgrid_words_and_times(tmp_path, text):
    path = tmp_path / "a.TextGrid"
    path.write_text(text)
    assert inputs.read_textgrid(path) == (['say "hi"', "there"], [0.1, 0.52], [0.52, 0.9])


def test_ctm_words_sorted_by_time_and_pauses_dropped(tmp_path):
    path = tmp_path / "a.ctm"
    path.write_text(";; comment\nu1 1 0.50 0.20 there 0.9\nu1 1 0.10 0.30 hello\nu1 1 0.40 0.10 <eps>\nu2 A 0 1 x\n")
    assert inputs.read_ctm(path) == {"u1": (["hello", "there"], [0.1, 0.5], [0.4, 0.7]), "u2": (["x"], [0.0], [1.0])}


# -- refusals: exit status 2, a message naming the file and line, nothing written ------------------


def refused(argv, out: Path, capsys, *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not out.exists()


def test_a_pickled_kmeans_is_refused_without_the_flag(hubert_dir, kmeans, audio, encoded, tmp_path, capsys):
    centroids = np.load(kmeans)
    pickled = tmp_path / "km.pkl"
    pickled.write_bytes(pickle.dumps(SimpleNamespace(cluster_centers_=centroids)))  # as scikit-learn's, in shape
    disguised = tmp_path / "km_pickle.npy"
    disguised.write_bytes(pickled.read_bytes())
    for path in (pickled, disguised):
        refused(hubert_args(hubert_dir, path, tmp_path / "out", audio.manifest), tmp_path / "out", capsys,
                str(path), "--allow-pickle", "convert-kmeans")
    refused(["convert-kmeans", str(pickled), str(tmp_path / "plain.npy")], tmp_path / "plain.npy", capsys, "--allow-pickle")
    # With the flag: the same units as the plain file, and a conversion with the same hash.
    with_flag = tmp_path / "with-flag"
    assert main(hubert_args(hubert_dir, pickled, with_flag, audio.manifest, extra=["--allow-pickle", "--shard-size", "5"])) == 0
    assert shard_bytes(with_flag) == shard_bytes(encoded)
    assert main(["convert-kmeans", str(pickled), str(tmp_path / "plain.npy"), "--allow-pickle"]) == 0
    assert np.array_equal(np.load(tmp_path / "plain.npy", allow_pickle=False), centroids)


def test_bad_inputs_are_refused_by_file_and_line(hubert_dir, kmeans, audio, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(audio.root / audio.rows[0]["path"]), "transcript": "a b"}) + "\n"
                        + json.dumps({"path": str(audio.root / audio.rows[1]["path"])}) + "\n")
    refused(hubert_args(hubert_dir, kmeans, out, manifest), out, capsys, f"{manifest}:2", "'transcript'")
    manifest.write_text(json.dumps({"path": "missing.wav", "transcript": "a"}) + "\n")
    refused(hubert_args(hubert_dir, kmeans, out, manifest), out, capsys, f"{manifest}:1", "missing.wav")
    bad_ctm = tmp_path / "bad.ctm"
    bad_ctm.write_text(f"{audio.rows[0]['id']} 1 0.1 oops word\n")
    refused(hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--alignments", str(bad_ctm)]), out, capsys,
            f"{bad_ctm}:1")
    late = tmp_path / "late.ctm"
    late.write_text("".join(f"{r['id']} 1 0.1 9.0 word\n" for r in audio.rows))  # ends after the audio
    refused(hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--alignments", str(late)]), out, capsys,
            "after the audio")
    refused(hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--layer", "9"]), out, capsys, "--layer 9")
    bare = audio.root / audio.rows[0]["path"]
    refused(hubert_args(hubert_dir, kmeans, out, bare), out, capsys, "no transcript", bare.with_suffix(".txt").name)
    out.mkdir()
    assert main(hubert_args(hubert_dir, kmeans, out, audio.manifest)) == 2
    assert "already exists" in capsys.readouterr().err and not list(out.iterdir())


def test_missing_packages_are_named(monkeypatch, mimi_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(inputs.InputError, match="requirements-audio.txt"):
        encoders.MimiEncoder(str(mimi_dir), "cpu", 1)
    monkeypatch.setitem(sys.modules, "speechtokenizer", None)
    with pytest.raises(inputs.InputError, match="pip install speechtokenizer"):
        encoders.SpeechTokenizerEncoder(str(mimi_dir), "cpu")


def float_wav(path: Path, bad_value: float, at: int = 8000) -> Path:
    samples = noise(1.0, 16000, 1).astype(np.float32)
    samples[at] = bad_value
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_audio_is_refused(bad, hubert_dir, kmeans, mimi_dir, audio, tmp_path, capsys):
    wav = float_wav(tmp_path / "bad.wav", bad)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(audio.root / audio.rows[0]["path"]), "transcript": "a"}) + "\n"
                        + json.dumps({"path": str(wav), "transcript": "b"}) + "\n")
    out = tmp_path / "out"
    for encoder in (["--encoder", "hubert", "--model", str(hubert_dir), "--layer", str(LAYER), "--kmeans", str(kmeans)],
                    ["--encoder", "mimi", "--model", str(mimi_dir)],
                    ["--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz")]):
        refused(["encode", str(out), *encoder, "--device", "cpu", "--quiet", str(manifest)], out, capsys,
                f"{manifest}:2", str(wav), "NaN or infinite samples", "0.500 s")
    centroids = tmp_path / "km.npy"
    for encoder in (["--encoder", "hubert", "--model", str(hubert_dir), "--layer", str(LAYER)], ["--encoder", "logmel"]):
        refused(["learn-kmeans", str(centroids), *encoder, "--k", "2", "--device", "cpu", "--quiet", str(manifest)],
                centroids, capsys, str(wav), "NaN or infinite samples")


def test_non_finite_features_are_refused(hubert_dir, audio, tmp_path, capsys, monkeypatch):
    x = np.random.default_rng(0).normal(size=(100, 4))
    x[7, 2] = np.nan
    for fit in (features.fit_kmeans, features.fit_kmeans_torch):
        with pytest.raises(features.FeatureError, match="NaN or infinite values \\(1 of 100 frames\\)"):
            fit(x, 4, seed=0)
    # A model whose features hold NaN (here made to): learn-kmeans names the utterance, writes nothing.
    real = encoders.HubertEncoder.features
    monkeypatch.setattr(encoders.HubertEncoder, "features", lambda self, audios: [f * np.nan for f in real(self, audios)])
    out = tmp_path / "km.npy"
    refused(["learn-kmeans", str(out), "--encoder", "hubert", "--model", str(hubert_dir), "--layer", str(LAYER),
             "--k", "4", "--device", "cpu", "--quiet", str(audio.manifest)], out, capsys,
            f"{audio.manifest}:", "features hold NaN or infinite values")


def test_input_refused_midway_leaves_nothing_behind(hubert_dir, kmeans, audio, tmp_path, capsys, monkeypatch):
    """Shard 0 is written before utterance 5's features turn out NaN: the new directory goes."""
    real, calls = encoders.HubertEncoder.features, []

    def nan_from_the_second_shard(self, audios):
        calls.append(len(audios))
        return [f * np.nan if len(calls) > 1 else f for f in real(self, audios)]

    monkeypatch.setattr(encoders.HubertEncoder, "features", nan_from_the_second_shard)
    out = tmp_path / "new" / "out"
    refused(hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--shard-size", "5", "--batch-size", "5"]),
            out, capsys, f"{audio.manifest}:6", "NaN or infinite")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("split", ["../../evil", "a/b", "/tmp/abs", "..", ".", ".hidden", "", "a\\b", "x y"])
def test_split_must_be_a_plain_name(split, tmp_path, capsys):
    soundfile.write(tmp_path / "a.wav", noise(0.5, 16000, 0), 16000)
    (tmp_path / "m.tsv").write_text("a.wav\thello\n")
    out = tmp_path / "deep" / "er" / "out"
    refused(["encode", str(out), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--quiet",
             "--split", split, str(tmp_path / "m.tsv")], out, capsys, "--split", "plain name")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.wav", "m.tsv"]  # nothing written anywhere


def test_a_textgrid_is_looked_up_only_inside_its_directory(tmp_path):
    grids = tmp_path / "grids"
    grids.mkdir()
    (tmp_path / "x.TextGrid").write_text(SHORT_TEXTGRID)
    u = inputs.Utterance("../x", tmp_path / "a.wav", "a", "m.jsonl:1")
    with pytest.raises(inputs.InputError, match="m.jsonl:1: id '../x' would name a TextGrid outside"):
        inputs.attach_alignments([u], str(grids))


def completed_encoding(tmp_path: Path, **changes) -> Path:
    """An encoding directory (mfcc, one utterance) with `changes` made to its units.json."""
    soundfile.write(tmp_path / "a.wav", noise(0.5, 16000, 0), 16000)
    (tmp_path / "m.tsv").write_text("a.wav\thello\n")
    out = tmp_path / "enc"
    assert main(["encode", str(out), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--quiet",
                 str(tmp_path / "m.tsv")]) == 0
    meta = out / "units.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **changes}))
    return out


@pytest.mark.parametrize("content, expected", [
    ("{", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"n_dsus": True}, "field 'n_dsus'"),
    ({"n_dsus": "128"}, "field 'n_dsus'"),
    ({"n_dsus": 0}, "field 'n_dsus'"),
    ({"sampling_rate": 16000.0}, "field 'sampling_rate'"),
    ({"downsampling_ratio": None}, "field 'downsampling_ratio'"),
    ({"complete": 1}, "field 'complete'"),
    ({"complete": False}, "unfinished"),
], ids=["truncated", "list", "bool", "string", "zero", "float", "null", "complete-1", "incomplete"])
def test_overrides_refuses_a_malformed_units_json(content, expected, tmp_path, capsys):
    out = completed_encoding(tmp_path)
    capsys.readouterr()
    assert main(["overrides", str(out)]) == 0
    assert capsys.readouterr().out.split() == shards.overrides_for(out)
    meta = out / "units.json"
    meta.write_text(content if isinstance(content, str) else json.dumps({**json.loads(meta.read_text()), **content}))
    assert main(["overrides", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_resume_compares_settings_as_json_values(tmp_path, capsys):
    out = completed_encoding(tmp_path, stack=True, complete=False)  # true is not the integer 1
    assert main(["encode", str(out), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--quiet",
                 str(tmp_path / "m.tsv"), "--resume"]) == 2
    assert "differs from the one there in stack" in capsys.readouterr().err


def test_encodings_made_before_chunk_context_resume_only_where_the_units_are_unchanged(
        hubert_dir, kmeans, audio, encoded, tmp_path, capsys):
    mfcc = completed_encoding(tmp_path, complete=False)
    hubert = tmp_path / "hubert"
    shutil.copytree(encoded, hubert)
    for out in (mfcc, hubert):
        info = json.loads((out / "units.json").read_text())
        del info["chunk_context_samples"]  # as written before it was recorded
        (out / "units.json").write_text(json.dumps(info))
    assert main(["encode", str(mfcc), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--quiet",
                 str(tmp_path / "m.tsv"), "--resume"]) == 0  # MFCC is never chunked
    assert main([*hubert_args(hubert_dir, kmeans, hubert, audio.manifest, extra=["--shard-size", "5"]), "--resume"]) == 2
    assert "differs from the one there in chunk_context_samples" in capsys.readouterr().err


def test_bad_model_configs_are_refused(hubert_dir, tmp_path):
    model = tmp_path / "hubert"
    shutil.copytree(hubert_dir, model)
    for preprocessor, field in (({"sampling_rate": True}, "sampling_rate"), ({"do_normalize": 1}, "do_normalize"),
                                ("[", "invalid JSON")):
        (model / "preprocessor_config.json").write_text(preprocessor if isinstance(preprocessor, str)
                                                        else json.dumps(preprocessor))
        with pytest.raises(inputs.InputError, match=f"preprocessor_config.json(:1:2)?: .*{field}"):
            encoders.HubertEncoder(str(model), LAYER, None, "cpu", 1)


def returns_within(seconds: float, argv: list[str]) -> int:
    """main(argv), failing the test instead of hanging if it blocks (on a FIFO)."""
    result = []
    worker = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"blocked: {argv}"
    return result[0]


def test_fifos_are_refused_without_blocking(hubert_dir, kmeans, audio, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(fifo), "transcript": "a"}) + "\n")
    cases = [
        (hubert_args(hubert_dir, kmeans, out, fifo.with_suffix(".jsonl")), fifo.with_suffix(".jsonl")),  # manifest
        (hubert_args(hubert_dir, kmeans, out, manifest), fifo),  # audio
        (hubert_args(hubert_dir, fifo, out, audio.manifest), fifo),  # k-means
        (hubert_args(hubert_dir, kmeans, out, audio.manifest, extra=["--alignments", str(fifo)]), fifo),  # CTM
    ]
    os.mkfifo(fifo.with_suffix(".jsonl"))
    for argv, named in cases:
        assert returns_within(60, argv) == 2
        err = capsys.readouterr().err
        assert f"{named}: is a FIFO" in err, err
        assert not out.exists()
    model = tmp_path / "model"
    shutil.copytree(hubert_dir, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    assert returns_within(60, hubert_args(model, kmeans, out, audio.manifest)) == 2
    assert "model.safetensors: is a FIFO" in capsys.readouterr().err
    encoding = tmp_path / "enc"
    (encoding / "data").mkdir(parents=True)
    os.mkfifo(encoding / "units.json")
    assert returns_within(60, ["overrides", str(encoding)]) == 2
    assert "units.json: is a FIFO" in capsys.readouterr().err


def test_chunk_seconds_must_be_a_positive_number(tmp_path, capsys):
    out = tmp_path / "out"
    for value in ("nan", "inf", "0", "-1"):
        refused(["encode", str(out), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--chunk-seconds", value,
                 str(tmp_path / "a.wav")], out, capsys, "--chunk-seconds")


# -- the bundled corpus ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_resynthesised_bundled_audio_gives_the_bundled_units(tmp_path):
    """The first test utterances of data/mini, spoken again as speech_units.corpus did, encoded by the MFCC
    encoder with the bundled k-means: the bundled rows, word times included."""
    meta = json.loads((MINI / "corpus.json").read_text())
    sizes = {split: s["utterances"] for split, s in meta["sizes"].items()}
    sentences = corpus.split_sentences(sizes["train"], sizes["dev"], sizes["test"], meta["seed"])["test"]
    speakers = corpus.split_speakers(meta["seed"])["test"]
    bundled = [json.loads(line) for line in (MINI / "test.jsonl").read_text().splitlines()[:4]]
    manifest = []
    for i, row in enumerate(bundled):
        assert (sentences[i], speakers[i % len(speakers)]) == (row["transcript"], row["speaker"])
        rng = np.random.default_rng([meta["seed"], 3, corpus.SPLITS.index("test"), i])
        pcm, starts, ends = corpus.synthesize(row["transcript"].split(), row["speaker"], rng)
        corpus.write_wav(tmp_path / f"{row['id']}.wav", pcm)
        manifest.append({"id": row["id"], "path": f"{row['id']}.wav", "transcript": row["transcript"],
                         "tokenized": row["transcript"].split(), "aligned_token_start_time": starts,
                         "aligned_token_end_time": ends})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    out = tmp_path / "out"
    assert main(["encode", str(out), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--quiet",
                 str(tmp_path / "m.jsonl")]) == 0
    fields = ["id", "transcript", "tokenized", "aligned_token_start_time", "aligned_token_end_time", "speech_tokens"]
    assert shard_rows(out) == [{f: row[f] for f in fields} for row in bundled]
    assert json.loads((out / "units.json").read_text())["n_dsus"] == meta["n_dsus"]


@pytest.mark.parametrize("split, use", [("train", "train with: data.train="), ("validation", "data.dev="),
                                        ("test", "python generate.py CHECKPOINT --data ")])
def test_encode_says_how_its_split_is_used(tmp_path, capsys, split, use):
    soundfile.write(tmp_path / "a.wav", noise(0.5, 16000, 0), 16000)
    (tmp_path / "m.tsv").write_text("a.wav\thello there\n")
    out = tmp_path / "out"
    assert main(["encode", str(out), "--encoder", "mfcc", "--kmeans", str(MINI / "kmeans.npz"), "--quiet",
                 "--split", split, str(tmp_path / "m.tsv")]) == 0
    said = capsys.readouterr().err
    assert f"{use}{out / 'data'}" in said
    assert (split == "train") == ("data.train=" in said)


def test_manifests_and_bare_files(tmp_path, capsys):
    for name in ("a.wav", "b.flac"):
        soundfile.write(tmp_path / name, noise(0.5, 16000, 0), 16000)
    (tmp_path / "a.txt").write_text("hello  there\n")
    (tmp_path / "plain.tsv").write_text("a.wav\thello there\nb.flac\tgood bye\n")
    (tmp_path / "header.tsv").write_text("transcript\tid\tpath\nhi\tx1\ta.wav\n")
    found = inputs.read_inputs([str(tmp_path / "header.tsv"), str(tmp_path / "a.wav")])
    assert [(u.id, u.path.name, u.transcript) for u in found] == [("x1", "a.wav", "hi"), ("a", "a.wav", "hello there")]
    assert [(u.id, u.transcript) for u in inputs.read_inputs([str(tmp_path / "plain.tsv")])] == [
        ("a", "hello there"), ("b", "good bye")]
    with pytest.raises(inputs.InputError, match="a.wav: id 'a' repeats .*plain.tsv:1"):
        inputs.read_inputs([str(tmp_path / "plain.tsv"), str(tmp_path / "a.wav")])
    # learn-kmeans needs no transcripts, and only encoders whose units are k-means clusters.
    assert inputs.read_inputs([str(tmp_path / "b.flac")], need_transcript=False)[0].transcript == ""
    out = tmp_path / "km.npy"
    refused(["learn-kmeans", str(out), "--encoder", "mimi", "--k", "4", str(tmp_path / "b.flac")], out, capsys,
            "own codebook")
    assert main(["learn-kmeans", str(out), "--encoder", "logmel", "--k", "4", "--quiet", str(tmp_path / "b.flac")]) == 0
    assert np.load(out).shape == (4, features.LOGMEL_DIM)

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.dataset import load_rows
from speech_units import corpus, features
from speech_units.corpus import main

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
K = 8
SPLIT_SIZES = {"train": 4, "dev": 2, "test": 2}

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (sudo apt-get install espeak-ng)")


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    n = SPLIT_SIZES
    assert main(["build", str(out_dir), "--n-train", str(n["train"]), "--n-dev", str(n["dev"]),
                 "--n-test", str(n["test"]), "--k", str(K), "--seed", str(seed), "--save-wav"]) == 0  # fmt: skip
    return out_dir


def read_split(out_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out_dir / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (sudo apt-get install espeak-ng)")
    return build_tiny(tmp_path_factory.mktemp("corpus") / "tiny")


def rows_with_audio(out_dir: Path):
    for split in SPLIT_SIZES:
        for row in read_split(out_dir, split):
            audio, rate = corpus.read_wav(out_dir / "wav" / split / f"{row['id']}.wav")
            assert rate == 16000
            yield row, audio


@needs_espeak
def test_build_writes_every_split_in_the_reference_schema(tiny):
    for split, n in SPLIT_SIZES.items():
        rows = load_rows(str(tiny / f"{split}.jsonl"), n_dsus=K)
        assert len(rows) == n
        allowed = {**corpus.TRAIN_SPEAKERS, **{"train": {}, "dev": corpus.DEV_ONLY_SPEAKERS,
                                                 "test": corpus.TEST_ONLY_SPEAKERS}[split]}
        for row in rows:
            assert row["tokenized"] == row["transcript"].split()
            assert row["speaker"] in allowed
    assert (tiny / "README.md").exists()


@needs_espeak
def test_word_times_are_monotone_and_inside_the_audio(tiny):
    for row, audio in rows_with_audio(tiny):
        starts, ends = row["aligned_token_start_time"], row["aligned_token_end_time"]
        assert len(starts) == len(ends) == len(row["tokenized"])
        bounds = [t for pair in zip(starts, ends) for t in pair]
        assert bounds == sorted(bounds) and all(s < e for s, e in zip(starts, ends))
        assert 0 <= starts[0] and ends[-1] <= len(audio) / 16000
        assert math.ceil(ends[-1] * 16000 / 320) <= len(row["speech_tokens"])  # last word's DSU span exists


@needs_espeak
def test_one_dsu_per_frame_and_all_in_range(tiny):
    for row, audio in rows_with_audio(tiny):
        assert len(row["speech_tokens"]) == 1 + (len(audio) - 400) // 320
        assert all(0 <= t < K for t in row["speech_tokens"])


@needs_espeak
def test_the_same_seed_rebuilds_identical_files(tiny, tmp_path):
    again = build_tiny(tmp_path / "again")
    for name in ["train.jsonl", "dev.jsonl", "test.jsonl", "kmeans.npz", "wav/test/test-00000.wav"]:
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name


@needs_espeak
def test_another_voice_gives_other_tokens(tiny):
    centroids = features.load_centroids(tiny / "kmeans.npz", settings=features.FEATURE_SETTINGS)
    words = "put the red box on the small table".split()
    tokens = {}
    for speaker in ["en-us+m1", "en+f4"]:
        pcm, _, _ = corpus.synthesize(words, speaker, np.random.default_rng(7))
        tokens[speaker] = features.assign(features.mfcc_features(pcm / 32768.0), centroids).tolist()
    assert tokens["en-us+m1"] != tokens["en+f4"]


@needs_espeak
def test_every_voice_is_a_distinct_sound():
    # espeak-ng ignores the variant of some specs ("en-gb+f4" is plain en-gb): at the same speed
    # and pitch, no two speakers may give the same audio, or two "speakers" would be one voice.
    audio = {}
    for speaker in corpus.SPEAKERS:
        pcm = corpus.espeak_word("table", speaker, 160, 50)
        key = np.round(pcm, 4).tobytes()
        assert key not in audio, (speaker, audio.get(key))
        audio[key] = speaker


@needs_espeak
def test_splits_share_no_sentence_and_test_has_an_unseen_voice(tiny):
    transcripts = {split: {r["transcript"] for r in read_split(tiny, split)} for split in SPLIT_SIZES}
    assert not (transcripts["train"] & transcripts["dev"] or transcripts["train"] & transcripts["test"]
                or transcripts["dev"] & transcripts["test"])  # fmt: skip
    voices = json.loads((tiny / "corpus.json").read_text())["voices"]
    assert voices["train"] == sorted({r["speaker"] for r in read_split(tiny, "train")})
    for split in ("dev", "test"):
        unseen = voices[f"{split}_only"]
        assert unseen and not set(unseen) & set(voices["train"])
        speakers = [r["speaker"] for r in read_split(tiny, split)]
        assert speakers[0] in unseen  # even a split of one utterance has a voice training never heard
        assert set(unseen) <= set(speakers) if len(speakers) >= 2 * len(unseen) else True


def test_dev_and_test_alternate_unseen_and_training_voices():
    speakers = corpus.split_speakers(seed=0)
    assert sorted(speakers["train"]) == sorted(corpus.TRAIN_SPEAKERS)
    for split, unseen in (("dev", corpus.DEV_ONLY_SPEAKERS), ("test", corpus.TEST_ONLY_SPEAKERS)):
        cycle = speakers[split]
        assert all(s in unseen for s in cycle[0::2]) and all(s in corpus.TRAIN_SPEAKERS for s in cycle[1::2])
        assert set(cycle[0::2]) == set(unseen) and set(cycle[1::2]) == set(corpus.TRAIN_SPEAKERS)
    assert not set(corpus.DEV_ONLY_SPEAKERS) & set(corpus.TEST_ONLY_SPEAKERS)


def test_grammar_splits_at_full_size_are_disjoint_and_short():
    splits = corpus.split_sentences(1500, 100, 100, seed=0)
    assert [len(s) for s in splits.values()] == [1500, 100, 100]
    all_sentences = [s for texts in splits.values() for s in texts]
    assert len(set(all_sentences)) == len(all_sentences)
    assert all(3 <= len(s.split()) <= corpus.MAX_WORDS for s in all_sentences)
    assert splits == corpus.split_sentences(1500, 100, 100, seed=0)
    assert splits != corpus.split_sentences(1500, 100, 100, seed=1)


@needs_espeak
def test_encode_reproduces_the_tokens_of_the_build(tiny, tmp_path):
    built = read_split(tiny, "test")
    listing = tmp_path / "list.tsv"
    listing.write_text("".join(f"{tiny}/wav/test/{r['id']}.wav\t{r['transcript']}\n" for r in built))
    out = tmp_path / "encoded.jsonl"
    assert main(["encode", str(tiny / "kmeans.npz"), str(out), str(listing)]) == 0
    encoded = load_rows(str(out), n_dsus=K, fields=("transcript", "tokenized", "speech_tokens"))
    assert [r["id"] for r in encoded] == [r["id"] for r in built]
    for mine, theirs in zip(encoded, built):
        assert mine["speech_tokens"].tolist() == theirs["speech_tokens"]
        assert mine["tokenized"] == theirs["tokenized"]
        assert "aligned_token_start_time" not in mine


@needs_espeak
def test_encode_rejects_a_bad_list_line_and_writes_nothing(tiny, tmp_path, capsys):
    listing = tmp_path / "list.tsv"
    listing.write_text(f"{tiny}/wav/test/test-00000.wav\thello\nno-tab-here\n")
    out = tmp_path / "encoded.jsonl"
    assert main(["encode", str(tiny / "kmeans.npz"), str(out), str(listing)]) == 2
    assert f"{listing}:2" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [listing]


def test_build_refuses_an_existing_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["build", str(tmp_path), "--n-train", "1", "--k", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_resampling_keeps_a_tone_and_removes_what_cannot_be_represented():
    t = np.arange(22050) / 22050
    tone = features.resample(np.sin(2 * np.pi * 1000 * t), 22050, 16000)
    assert len(tone) == 16000
    expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(tone - expected)[100:-100].max() < 1e-3
    above_nyquist = features.resample(np.sin(2 * np.pi * 10000 * t), 22050, 16000)
    assert np.abs(above_nyquist)[100:-100].max() < 1e-3


@pytest.mark.parametrize("n_samples, n_frames", [(400, 1), (719, 1), (720, 2), (16000, 49)])
def test_frame_count_is_one_per_full_window(n_samples, n_frames):
    audio = np.random.default_rng(0).normal(0, 0.1, n_samples)
    assert features.frame_count(n_samples) == n_frames == len(features.mfcc_features(audio))


def test_kmeans_is_deterministic_given_the_seed():
    points = np.random.default_rng(0).normal(size=(2000, 5))
    first = features.fit_kmeans(points, 16, seed=3)
    assert np.array_equal(first, features.fit_kmeans(points, 16, seed=3))
    assert not np.array_equal(first, features.fit_kmeans(points, 16, seed=4))
    labels = features.assign(points, first)
    assert np.allclose(first[5], points[labels == 5].mean(0))  # converged: each centroid is its cluster's mean


def test_bundled_mini_corpus_loads():
    meta = json.loads((MINI / "corpus.json").read_text())
    k = meta["n_dsus"]
    assert features.load_centroids(MINI / "kmeans.npz", settings=features.FEATURE_SETTINGS).shape == (k, features.FEATURE_DIM)
    for split, size in meta["sizes"].items():
        rows = load_rows(str(MINI / f"{split}.jsonl"), n_dsus=k)
        assert len(rows) == size["utterances"] > 0
        assert sum(len(r["speech_tokens"]) for r in rows) == size["frames"]
    assert meta["voices"]["test_only"]


def test_a_kmeans_file_made_with_other_feature_settings_is_refused(tmp_path):
    path = tmp_path / "kmeans.npz"
    np.savez(path, centroids=np.zeros((4, features.FEATURE_DIM)), **{**features.FEATURE_SETTINGS, "n_mels": 80})
    with pytest.raises(features.FeatureError, match="n_mels"):
        features.load_centroids(path, settings=features.FEATURE_SETTINGS)

"""From audio to the discrete speech units (DSUs) training reads; `python -m speech_units`.

    inputs.py    audio files, manifests, word alignments (CTM, TextGrid), audio reading
    features.py  MFCC and log-mel frames, resampling, k-means fitting and centroid files
    encoders.py  hubert, mimi, speechtokenizer, mfcc, logmel; long audio encoded in pieces
    shards.py    the shard writer: Parquet shards and units.json, and the train.py settings they imply
    cli.py       the commands: encode, learn-kmeans, convert-kmeans, overrides
    corpus.py    the bundled mini corpus (data/mini): synthesised with espeak-ng, MFCC units
"""

"""Time `prepare_data` building the default corpus's token caches from its cached text and
tokenizer, with `data.num_proc` processes (issue 14):

    PYTHONPATH=src python docs/benchmarks/data-2026-12-02/build_default_corpus.py DATA_DIR NUM_PROC

DATA_DIR: a data_dir whose shakespeare/ text and cache/tokenizer-*.json exist (a copy of data/);
its token caches are deleted first."""

import shutil
import sys
import time
from pathlib import Path

from spannorm.data import TextDataModule


def main() -> None:
    data_dir, num_proc = Path(sys.argv[1]), int(sys.argv[2])
    for split in (data_dir / "cache").glob("tokens-*"):
        if split.is_dir():
            shutil.rmtree(split)
    module = TextDataModule(source="shakespeare", data_dir=str(data_dir), num_proc=num_proc)
    start = time.perf_counter()
    module.prepare_data()
    print(f"num_proc {num_proc}: build {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

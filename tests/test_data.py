"Corpus preparation, tokenizers, mixing and the per-rank sampler."

import numpy as np
import torch
from scaletrain.config import DataConfig
from scaletrain.data import prepare_data, BatchSampler, ByteTokenizer


def test_mixture_weights_and_memmap(tmp_path, corpus):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(6):
        (other / f"o{i}.md").write_text("# zzzz\n" * 300)
    d = prepare_data(DataConfig(source=f"{corpus}:3,{other}:1", cache_dir=str(tmp_path / "c")), show_progress=False)
    assert [round(w) for w in d.weights] == [3, 1]
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint16 for a in d.train + d.val)
    s = BatchSampler(d.train, d.weights, 16, 400, seed=1)
    src, _ = s.rows(0)
    assert 0.65 < (src == 0).mean() < 0.85  # about 3:1
    x, _ = s.batch(0)
    text = [ByteTokenizer().decode(r.tolist()) for r in x]
    assert sum("zzzz" in t for t in text) == (src == 1).sum()


def test_bpe_tokenizer_is_trained_once_and_cached(tmp_path, corpus):
    cfg = DataConfig(source=str(corpus), tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / "c"))
    d = prepare_data(cfg, show_progress=False)
    assert (d.folder / "tokenizer.json").is_file() and d.vocab_size <= 300
    mtime = (d.folder / "tokenizer.json").stat().st_mtime_ns
    d2 = prepare_data(cfg, show_progress=False)
    assert d2.folder == d.folder and (d.folder / "tokenizer.json").stat().st_mtime_ns == mtime
    ids = d.tokenizer.encode("def f1(x):\n    return x")
    assert d.tokenizer.decode(ids) == "def f1(x):\n    return x"
    assert len(ids) < len("def f1(x):\n    return x")  # merges learned


def test_ranks_see_disjoint_shards_whose_union_is_the_global_batch(tmp_path, corpus):
    d = prepare_data(DataConfig(source=str(corpus), cache_dir=str(tmp_path / "c")), show_progress=False)
    s = BatchSampler(d.train, d.weights, 16, 12, seed=3)
    whole = s.batch(5)[0]
    parts = [s.batch(5, r, 3)[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    src, starts = s.rows(5)
    assert len(set(starts.tolist())) == 12  # distinct windows (overwhelmingly likely on this corpus)

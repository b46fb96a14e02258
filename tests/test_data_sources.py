"""Your own data: JSONL/parquet/arrow records by their text field, mixtures of them, any tokenizer.json (a vocabulary
above 65,536 ids trains end to end from a uint32 cache), and one line with exit 2 for each kind of bad data."""

import json
import numpy as np
import pytest
from conftest import run_cli, tiny
from scaletrain.config import DataConfig
from scaletrain.data import ByteTokenizer, prepare_data
from scaletrain.errors import DataError

pa = pytest.importorskip("pyarrow", reason="parquet/arrow sources need pyarrow (pip install scaletrain[data])")
import pyarrow.parquet as pq  # noqa: E402


def error_line(r) -> str:
    "The one error line (tqdm's progress may come before it), with no traceback."
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errs = [l for l in r.stderr.splitlines() if l.startswith("scaletrain: error: ")]
    assert len(errs) == 1 and r.stderr.rstrip().endswith(errs[0]), r.stderr[-2000:]
    return errs[0]


def records(n, tag):
    return [{"id": i, "text": f"{tag} document {i}: " + "lorem ipsum dolor sit amet " * 8} for i in range(n)]


def write_sources(root):
    "A text folder holding a JSONL file, a parquet file and an arrow stream (as `datasets` writes them)."
    (root / "folder").mkdir(parents=True)
    (root / "folder" / "a.txt").write_text("plain text file " * 60)
    (root / "folder" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records(30, "jsonl")) + "\n")
    pq.write_table(pa.Table.from_pylist(records(30, "parquet")), root / "p.parquet")
    table = pa.Table.from_pylist(records(30, "arrow"))
    with pa.OSFile(str(root / "s.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def text_of(data, i):
    return ByteTokenizer().decode(np.concatenate([data.train[i], data.val[i]]).tolist())


def test_records_are_read_by_their_text_field_and_mixed_by_weight(tmp_path):
    write_sources(tmp_path)
    spec = f"{tmp_path / 'folder'}:0.5,{tmp_path / 'p.parquet'}:0.3,{tmp_path / 's.arrow'}:0.2"
    data = prepare_data(DataConfig(source=spec, cache_dir=str(tmp_path / "cache")), show_progress=False)
    assert data.weights == [0.5, 0.3, 0.2]
    folder, parquet, arrow = (text_of(data, i) for i in range(3))
    assert "plain text file" in folder and "jsonl document 29:" in folder
    assert '"id"' not in folder and "{" not in folder  # the JSONL file was read as records, not as raw JSON
    assert parquet.count("parquet document") == 30 and "id" not in parquet.replace("ipsum", "")
    assert arrow.count("arrow document") == 30
    # one end-of-text id after each record: documents stay apart
    eot = np.concatenate([data.train[1], data.val[1]]) == ByteTokenizer.eot
    assert eot.sum() == 30


@pytest.mark.parametrize(
    "what, make, expect",
    [
        ("jsonl field", lambda d: (d / "x.jsonl").write_text('{"body": "hi"}\n'), "data.text_field='text'"),
        ("jsonl line", lambda d: (d / "x.jsonl").write_text('{"text": "ok"}\nnot json\n'), "x.jsonl:2: not a JSON"),
        ("jsonl type", lambda d: (d / "x.jsonl").write_text('{"text": 3}\n'), "holds a int, not text"),
        ("parquet bytes", lambda d: (d / "x.parquet").write_bytes(b"PAR1 this is not parquet"), "cannot read"),
        ("parquet column", lambda d: pq.write_table(pa.table({"body": ["a"]}), d / "x.parquet"), "its columns: body"),
    ],
)
def test_bad_records_are_one_line_exit_2_and_nothing_written(tmp_path, what, make, expect):
    d = tmp_path / "data"
    d.mkdir()
    make(d)
    out = tmp_path / "runs"
    r = run_cli("train", *tiny(d, tmp_path / "cache", out))
    assert r.returncode == 2, (what, r.stderr[-1500:])
    err = error_line(r)
    assert expect in err, (what, err)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(DataError):  # and the library raises it, for a notebook
        prepare_data(DataConfig(source=str(d), cache_dir=str(tmp_path / "cache")), show_progress=False)


def word_tokenizer(path, n_words=70_000):
    "A word-level tokenizer.json of `n_words` words plus <unk> and <|endoftext|>."
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n_words)} | {"<unk>": n_words, "<|endoftext|>": n_words + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_a_70k_vocabulary_tokenizer_json_trains_end_to_end_from_a_uint32_cache(tmp_path):
    word_tokenizer(tmp_path / "tokenizer.json")
    d = tmp_path / "words"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # text that uses ids above 65,535
        (d / f"{i}.jsonl").write_text(
            "\n".join(
                json.dumps({"text": " ".join(f"w{w}" for w in rng.integers(66_000, 70_000, 300))}) for _ in range(4)
            )
        )
    out = tmp_path / "runs"
    extra = ["data.tokenizer=file", f"data.tokenizer_file={tmp_path / 'tokenizer.json'}", "model.tie_weights=true"]
    r = run_cli("train", *tiny(d, tmp_path / "cache", out, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = out.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and np.isfinite(summary["final_val_loss"])
    assert "vocab_size: 70002" in (run / "config.yaml").read_text()
    (meta,) = (tmp_path / "cache" / "tokens").glob("*/meta.json")
    m = json.loads(meta.read_text())
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_002
    toks = np.fromfile(meta.parent / "train_0.bin", dtype=np.uint32)
    assert toks.max() == 70_001 and (toks >= 66_000).mean() > 0.9  # the high ids survived, separated by EOT


def test_bad_tokenizer_files_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    word_tokenizer(tmp_path / "noend.json")
    raw = json.loads((tmp_path / "noend.json").read_text())
    raw["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "noend.json").write_text(json.dumps(raw))
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("w1 w2 " * 100)
    cases = [
        (["data.tokenizer=file", f"data.tokenizer_file={tmp_path / 'missing.json'}"], "no such file"),
        (["data.tokenizer=file", f"data.tokenizer_file={tmp_path / 'bad.json'}"], "not a tokenizers tokenizer.json"),
        (["data.tokenizer=file", f"data.tokenizer_file={tmp_path / 'noend.json'}"], "none of the end-of-text tokens"),
        (["data.tokenizer=file"], "data.tokenizer=file needs the file"),
    ]
    for extra, expect in cases:
        out = tmp_path / "runs"
        r = run_cli("train", *tiny(d, tmp_path / "cache", out, *extra))
        assert r.returncode == 2, (extra, r.stderr[-1500:])
        err = error_line(r)
        assert expect in err and "data.tokenizer" in err, (extra, err)
        assert not out.exists() or not any(out.iterdir())

"""Megatron's indexed data and blending (data/megatron/): the converter round trip, megatron's
builder over indexed prefixes and over our shard directories (ShardGPTDataset), the recipe wiring,
and the errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from acmoe_megatron.cli.data import main as data_main
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.data.megatron.blend_provider import shard_blend_datasets_provider
from acmoe_megatron.data.megatron.convert import indexed_to_shards, shards_to_indexed
from acmoe_megatron.data.megatron.indexed_provider import megatron_gpt_datasets_provider
from acmoe_megatron.data.megatron.shard_dataset import ShardGPTDataset
from acmoe_megatron.data.megatron.sidecar import read_sidecar
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.shards.store import ShardSamples, load_split_samples
from acmoe_megatron.data.shards.writer import prepare
from acmoe_megatron.runtime.recipe import load_recipe

SEQ = 16
RECIPE = "configs/tiny_cpu.yaml"


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two shard directories of different sizes (A larger than B) and their megatron prefixes."""
    root = tmp_path_factory.mktemp("megatron_data")
    a, b = root / "a", root / "b"
    prepare("stdlib", a, seq_length=SEQ, samples_per_shard=300, max_bytes=20_000, splits=["train", "valid"])
    prepare("stdlib", b, seq_length=SEQ, samples_per_shard=300, max_bytes=6_000, splits=["train", "valid"])
    pa = shards_to_indexed(a, root / "a_idx")
    pb = shards_to_indexed(b, root / "b_idx")
    return {"root": root, "a": a, "b": b, "pa": pa, "pb": pb}


@pytest.fixture(scope="module")
def megatron_runtime():
    from acmoe_megatron.runtime import cpu_runtime
    cpu_runtime.install_wheel_fixes()  # megatron's builder imports helpers_cpp; never compile it


def _args(*overrides):
    """megatron's parsed and validated arguments for the tiny recipe with ``overrides``, and its tokenizer."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from acmoe_megatron.runtime.megatron_args import build_argv
    from acmoe_megatron.runtime.run_plan import megatron_args

    recipe = load_recipe(RECIPE, [f"megatron.seq_length={SEQ}", f"megatron.max_position_embeddings={SEQ}",
                                  "megatron.eval_iters=2", "megatron.train_iters=20", *overrides])
    argv = build_argv(recipe, None)
    args = megatron_args(argv, 2)
    return recipe, argv, args, build_tokenizer(args)


# -- the converter ------------------------------------------------------------------------------


def test_round_trip_is_byte_identical(dirs, tmp_path):
    a = dirs["a"]
    manifest = read_manifest(a)
    prefix = dirs["pa"]["train"]
    # one megatron document per source document, each its tokens + the EOD, read by megatron itself
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    docs = [indexed[i] for i in range(len(indexed))]
    eod = manifest.tokenizer["eod"]
    assert len(docs) == manifest.splits["train"].num_documents
    assert all(d[-1] == eod and (d[:-1] != eod).all() for d in docs)
    _, samples = load_split_samples(a, "train")
    stream = np.concatenate(docs)
    assert np.array_equal(stream, samples.reshape(-1)[: manifest.splits["train"].num_tokens])
    sidecar = read_sidecar(prefix)
    assert sidecar["tokenizer"] == manifest.tokenizer and sidecar["seq_length"] == SEQ and sidecar["dtype"] == "uint16"

    back = tmp_path / "back"
    assert data_main(["from-megatron", str(dirs["root"] / "a_idx"), "--out", str(back), "--seq-length", str(SEQ)]) == 0
    assert _files(back) == _files(a)  # every shard, shard index and the manifest, byte for byte

    again = tmp_path / "again"  # and through the CLI in the other direction
    assert data_main(["to-megatron", str(back), "--out", str(again)]) == 0
    assert _files(again) == _files(dirs["root"] / "a_idx")


def test_repacking_to_another_seq_length_keeps_the_token_stream(dirs, tmp_path):
    out = tmp_path / "s40"
    manifest = indexed_to_shards(dirs["pa"]["train"], out, 40)
    source = read_manifest(dirs["a"])
    assert manifest.seq_length == 40 and list(manifest.splits) == ["train"]
    assert manifest.splits["train"].num_tokens == source.splits["train"].num_tokens
    _, old = load_split_samples(dirs["a"], "train")
    _, new = load_split_samples(out, "train")
    n = source.splits["train"].num_tokens
    assert np.array_equal(old.reshape(-1)[:n], new.reshape(-1)[:n])


def test_indexed_data_without_sidecar_needs_its_tokenizer(dirs, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(dirs["pa"]["train"] + suffix, foreign / f"train_text_document{suffix}")
    with pytest.raises(ValueError, match=r"no acmoe sidecar.*--tokenizer bytes"):
        indexed_to_shards(foreign, tmp_path / "x", SEQ)
    out = tmp_path / "y"
    manifest = indexed_to_shards(foreign, out, SEQ, 300, tokenizer="bytes")
    # the shards are the same; the manifest's text description is unknown without the sidecar
    assert {k: v for k, v in _files(out).items() if k.endswith(".tar")} == \
        {k: v for k, v in _files(dirs["a"]).items() if k.startswith("train-") and k.endswith(".tar")}
    assert manifest.source["kind"] == "megatron-indexed" and manifest.splits["train"].num_text_bytes == 0
    assert manifest.source["documents_without_eod"] == {"train": 0}


# -- megatron's builder over indexed prefixes ------------------------------------------------------


def test_megatron_blend_of_two_prefixes_has_the_weights(dirs, megatron_runtime, megatron_ws1):
    pa, pb = dirs["pa"]["train"], dirs["pb"]["train"]
    recipe, argv, args, tokenizer = _args(f"megatron.data_path=[0.3, {pa}, 0.7, {pb}]", "megatron.split='100,0,0'",
                                          f"megatron.data_cache_path={dirs['root'] / 'cache'}")
    # the recipe wiring: megatron's samplers, the vocabulary from the sidecars
    assert argv[argv.index("--dataloader-type") + 1] == "single"
    assert argv[argv.index("--vocab-size") + 1] == "257" and args.data_path == ["0.3", pa, "0.7", pb]
    from acmoe_megatron.runtime.train import make_datasets_provider

    provider = make_datasets_provider(recipe)
    assert provider is megatron_gpt_datasets_provider and provider.is_distributed
    train, valid, test = provider([2000, 0, 0], args=args, tokenizer=tokenizer)
    assert valid is None and test is None and len(train) >= 2000
    ids = np.array([int(train[i]["dataset_id"]) for i in range(2000)])
    share = np.bincount(ids, minlength=2) / len(ids)
    assert abs(share[0] - 0.3) <= 0.02 and abs(share[1] - 0.7) <= 0.02, share
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and torch.equal(sample["position_ids"], torch.arange(SEQ))


# -- our shard directories through megatron's blending ---------------------------------------------


def test_shard_blend_of_two_directories_has_the_weights(dirs, megatron_runtime, megatron_ws1):
    a, b = str(dirs["a"]), str(dirs["b"])
    assert len(ShardSamples(a, "train")) > len(ShardSamples(b, "train"))  # blending by size would favour A
    recipe, argv, args, tokenizer = _args(f"data.blend=[0.3, {a}, 0.7, {b}]")
    assert recipe.data.path == a  # the launch checks read the first directory's manifest
    assert argv[argv.index("--dataloader-type") + 1] == "single"
    from acmoe_megatron.runtime.train import make_datasets_provider

    provider = make_datasets_provider(recipe)
    assert provider.is_distributed
    train, valid, test = provider([2000, 64, 64], args=args, tokenizer=tokenizer)
    assert test is None  # the directories have no test split
    assert len(valid) >= 64 and all(d.index_split.name == "valid" for d in valid.datasets)
    ids = np.array([int(train.dataset_index[i]) for i in range(2000)])
    share = np.bincount(ids, minlength=2) / len(ids)
    assert abs(share[0] - 0.3) <= 0.02 and abs(share[1] - 0.7) <= 0.02, share
    stores = [ShardSamples(a, "train"), ShardSamples(b, "train")]
    for i in range(0, 2000, 97):  # each blended sample is the sample of the directory it names
        sample = train[i]
        dataset = train.datasets[int(sample["dataset_id"])]
        row = stores[int(sample["dataset_id"])].read([dataset.sample_id(int(train.dataset_sample_index[i]))])[0]
        assert np.array_equal(sample["tokens"].numpy(), row[:-1]) and np.array_equal(sample["labels"].numpy(), row[1:])


def test_shard_gpt_dataset_sample_is_the_stored_sample(dirs, megatron_runtime):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    b = dirs["b"]
    tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=257)
    config = GPTDatasetConfig(random_seed=7, sequence_length=SEQ, blend_per_split=[([f"{b}/train"], None), None, None],
                              tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False)
    store = ShardSamples(b, "train")
    n = len(store)
    (dataset, _, _) = BlendedMegatronDatasetBuilder(ShardGPTDataset, [2 * n + 3, None, None], lambda: True,
                                                    config).build()
    assert isinstance(dataset, ShardGPTDataset) and len(dataset) == 3 * n  # whole epochs
    for epoch in range(3):  # each epoch is a permutation of the split, and a different one
        ids = [dataset.sample_id(epoch * n + i) for i in range(n)]
        assert sorted(ids) == list(range(n))
        assert epoch == 0 or ids != first
        first = ids if epoch == 0 else first
    assert first != list(range(n))
    info = store.info
    last_real = info.sample_length(n - 1, store.sample_length)
    assert last_real < store.sample_length  # the split's last sample is EOD-padded
    for i in range(n):
        sample, sid = dataset[i], dataset.sample_id(i)
        row = store.read([sid])[0].astype(np.int64)
        assert np.array_equal(sample["tokens"].numpy(), row[:-1]) and np.array_equal(sample["labels"].numpy(), row[1:])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        expected = np.ones(SEQ, dtype=np.float32)
        if sid == n - 1:
            expected[last_real - 1:] = 0.0  # labels of the padding are not trained on
        assert np.array_equal(sample["loss_mask"].numpy(), expected), sid
    assert dataset[None]["loss_mask"].sum() == 0  # megatron's batch-padding sample


# -- bad input -----------------------------------------------------------------------------------


def test_missing_prefix_names_it_and_the_fix(dirs, tmp_path):
    missing = str(tmp_path / "nowhere" / "train_text_document")
    with pytest.raises(ConfigError, match=r"prefix .*nowhere/train_text_document has no .*acmoe-data to-megatron"):
        _args(f"megatron.data_path=[0.5, {dirs['pa']['train']}, 0.5, {missing}]")
    with pytest.raises(FileNotFoundError, match="do not exist; give a prefix"):
        indexed_to_shards(missing, tmp_path / "out", SEQ)


@pytest.mark.parametrize("weights, message", [
    ("-0.3, {a}, 1.3, {b}", "weight -0.3 .*not a positive number"),
    ("0, {a}, 1, {b}", "weight 0.0 .*not a positive number"),
    ("0.3, {a}, {b}", "looks like a weight but the list does not alternate"),
    ("{a}, {b}, 0.5, {a}", "some entries have a weight and some not"),
])
def test_bad_megatron_weights_are_refused(dirs, weights, message):
    listed = weights.format(a=dirs["pa"]["train"], b=dirs["pb"]["train"])
    with pytest.raises(ConfigError, match=message):
        _args(f"megatron.data_path=[{listed}]")


@pytest.mark.parametrize("blend, message", [
    ("[-0.3, {a}, 1.3, {b}]", "weight -0.3 .*not a positive number"),
    ("[0, {a}, 1, {b}]", "weight 0.* is not a positive number"),
    ("[0.3, {a}, {b}]", r"write \[weight1, dir1, weight2, dir2"),
    ("[0.5, {a}, 0.5, {root}/nothing]", "nothing is not a shard directory .*acmoe-data prepare"),
])
def test_bad_blend_is_refused(dirs, blend, message):
    value = blend.format(a=dirs["a"], b=dirs["b"], root=dirs["root"])
    with pytest.raises(ConfigError, match=message):  # the recipe key, at load time
        load_recipe(RECIPE, [f"data.blend={value}"])
    with pytest.raises(ValueError, match=message):  # the provider, for plain megatron scripts
        shard_blend_datasets_provider(_yaml(value))


def _yaml(text):
    import yaml

    return yaml.safe_load(text)


def test_blend_of_directories_with_different_vocabularies_is_refused(dirs, bpe_tokenizer_file, tmp_path,
                                                                     megatron_runtime):
    bpe = tmp_path / "bpe"
    prepare("stdlib", bpe, seq_length=SEQ, samples_per_shard=300, max_bytes=6_000, splits=["train", "valid"],
            tokenizer=str(bpe_tokenizer_file))
    fix = r"blended directories must share one tokenizer and seq_length; re-run `acmoe-data prepare` for .*bpe"
    with pytest.raises(ConfigError, match=rf"data.blend: .*bpe has tokenizer hash .*{fix}"):
        _args(f"data.blend=[0.5, {dirs['a']}, 0.5, {bpe}]")
    with pytest.raises(ValueError, match="tokenizer hash"):
        shard_blend_datasets_provider([0.5, str(dirs["a"]), 0.5, str(bpe)])
    # the same for indexed prefixes: their sidecars disagree
    prefixes = shards_to_indexed(bpe, tmp_path / "bpe_idx")
    with pytest.raises(ConfigError, match=r"tokenized with .*a blend needs one tokenizer"):
        _args(f"megatron.data_path=[0.5, {dirs['pa']['train']}, 0.5, {prefixes['train']}]")


def test_seq_length_and_dataloader_type_mismatches_name_the_fix(dirs):
    with pytest.raises(ConfigError, match="dataloader_type='external'.*single"):
        _args(f"megatron.data_path=[{dirs['pa']['train']}]", "megatron.dataloader_type=external")
    with pytest.raises(ConfigError, match="dataloader_type must be 'external' .*the data.path shards are read by our"):
        _args("megatron.dataloader_type=single", f"data.path={dirs['a']}")
    with pytest.raises(ConfigError, match=r"megatron.seq_length=32 but the shards in data.blend hold 16"):
        _args(f"data.blend=[1, {dirs['a']}]", "megatron.seq_length=32")
    with pytest.raises(ConfigError, match="both megatron.data_path and data.blend"):
        _args(f"data.blend=[1, {dirs['a']}]", f"megatron.data_path=[{dirs['pa']['train']}]")


def test_megatron_data_needs_no_shard_directory_at_data_path(dirs, tmp_path, megatron_runtime):
    """With megatron's data keys the launch checks, the launcher and the trainer leave data.path alone:
    no manifest is read there and no embedded corpus is built."""
    from acmoe_megatron.cli.common import ensure_data
    from acmoe_megatron.runtime.run_plan import build_plan, megatron_data_standin

    nowhere = tmp_path / "no_shards_here"
    recipe = load_recipe(RECIPE, [f"megatron.seq_length={SEQ}", f"megatron.max_position_embeddings={SEQ}",
                                  f"megatron.train_data_path=[{dirs['pa']['train']}]",
                                  f"megatron.valid_data_path=[{dirs['pa']['valid']}]", "megatron.eval_iters=2",
                                  f"data.path={nowhere}", "data.prepare_stdlib=true", f"run.dir={tmp_path / 'run'}"])
    plan = build_plan(recipe, 2)
    assert plan.data_ready and plan.args.dataloader_type == "single"
    ensure_data(recipe)
    assert not nowhere.exists()  # nothing built
    standin = megatron_data_standin(recipe)
    assert standin.tokenizer["vocab_size"] == 257 and standin.tokenizer["name"] == "bytes"

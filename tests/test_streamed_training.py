"""Training batches streamed from a sharded feature cache (`hf_align.training.streamed_batches`): an epoch is exactly its
training rows, in an order that is a function of (seed, epoch); training streamed reaches what training in memory
does and resumes exactly; the automatic choice follows the memory budget and says so. CPU."""

import logging
import math
import os
import socket
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from hf_align import AlignerModel, AlignmentArguments, evaluate_retrieval, train
from hf_align.features import features_for, features_from_tensors, split_by_image
from hf_align.testing import make_paired_task
from hf_align.training import batches, streamed_batches
from hf_align.training.batches import BatchSource, CaptionSampler
from hf_align.training.checkpoints import latest_checkpoint
from hf_align.training.streamed_batches import StreamedBatches, training_batches


def sharded(features: datasets.Dataset, path) -> datasets.Dataset:
    """`features` written as 4 Arrow shards and memory-mapped back: one Dataset whose cache files are the shards."""
    features.save_to_disk(str(path), num_shards=4)
    loaded = datasets.load_from_disk(str(path))
    assert len(loaded.cache_files) == 4
    return loaded


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory):
    """1500 pairs of the synthetic task, one caption per image, in 4 shards of 375 rows."""
    return sharded(make_paired_task(1500, seed=0).to_features(), tmp_path_factory.mktemp("task") / "cache")


@pytest.fixture(scope="module")
def captions_cache(tmp_path_factory):
    """120 images with 3 captions each (rows 3i..3i+2 are image 1000 + i), in 4 shards."""
    task = make_paired_task(120, n_vision_layers=1, n_text_layers=1, seed=4)
    g = torch.Generator().manual_seed(0)
    text = task.text[0].repeat_interleave(3, 0) + 0.05 * torch.randn(360, task.text[0].shape[1], generator=g)
    features = features_from_tensors(
        {0: task.vision[0].repeat_interleave(3, 0)}, {0: text}, image_id=1000 + torch.arange(120).repeat_interleave(3)
    )
    return sharded(features, tmp_path_factory.mktemp("captions") / "cache")


def linear_model(seed: int = 0) -> AlignerModel:
    torch.manual_seed(seed)
    return AlignerModel.from_feature_dims(64, 48, method="linear", projection_dim=32)


def epoch(stream, sampler, number, batch_size, **kwargs):
    return list(stream.epoch_batches(sampler, number, batch_size, **kwargs))


def assert_same_batch(expected: dict, got: dict):
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


# ---------------------------------------------------------------------------------------------- the stream
def test_an_epoch_streams_each_training_row_once_in_an_order_drawn_per_epoch(task_cache, monkeypatch):
    view = features_for(linear_model(), task_cache)
    train_rows, eval_rows = split_by_image(view, 0.2, seed=1)
    source = BatchSource(view)  # in memory: the reference tensors
    sampler = CaptionSampler(torch.from_numpy(train_rows), source.image_ids[train_rows], "auto", seed=5)
    stream = StreamedBatches(view, shuffle_buffer_size=200)
    assert torch.equal(stream.image_ids, source.image_ids) and stream.has_image_ids
    read = []
    real_read = StreamedBatches._read

    def recording_read(self, block, *args):
        read.append(block.part)
        return real_read(self, block, *args)

    monkeypatch.setattr(StreamedBatches, "_read", recording_read)
    epochs = [epoch(stream, sampler, number, 64, with_image_ids=True) for number in range(4)]
    orders = [read[4 * number : 4 * number + 4] for number in range(4)]
    for batches_of_epoch in epochs:
        assert len(batches_of_epoch) == math.ceil(1200 / 64) == 19  # what the in-memory path makes
        assert [len(rows) for rows, _ in batches_of_epoch] == [64] * 18 + [1200 - 18 * 64]
        rows = torch.cat([rows for rows, _ in batches_of_epoch])
        assert sorted(rows.tolist()) == train_rows.tolist()  # every training row once
        assert set(rows.tolist()).isdisjoint(eval_rows.tolist())  # and no validation row
        for batch_rows, batch in batches_of_epoch:
            assert_same_batch(source.fetch(batch_rows, with_image_ids=True), batch)
    # every shard is read once per epoch, in an order drawn per epoch (the four shards are one block each)
    assert len(read) == 16 and all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert len({tuple(order) for order in orders}) > 1 and any(order != [0, 1, 2, 3] for order in orders)
    # a function of (seed, epoch): the same again, another order the next epoch or with another seed
    again = epoch(stream, sampler, 2, 64)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(again, epochs[2]))
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    other_seed = CaptionSampler(torch.from_numpy(train_rows), source.image_ids[train_rows], "auto", seed=6)
    assert not torch.equal(epoch(stream, other_seed, 2, 64)[0][0], epochs[2][0][0])
    # a batch is drawn from the whole buffer: with room for two shards' rows (300 each), the first mixes two shards
    wide = StreamedBatches(view, shuffle_buffer_size=600)
    assert len({int(row) // 375 for row in epoch(wide, sampler, 0, 64)[0][0]}) == 2


def test_blocks_of_one_file_are_read_in_an_order_drawn_per_epoch(task_cache, tmp_path, monkeypatch):
    # one Arrow file written in record batches of 100 rows; blocks of >= 250 rows: 3 record batches each
    path = str(tmp_path / "single.arrow")
    task_cache.flatten_indices(cache_file_name=path, writer_batch_size=100)
    single = datasets.Dataset.from_file(path)
    assert len(single.cache_files) == 1
    monkeypatch.setattr(streamed_batches, "BLOCK_ROWS", 250)
    view = features_for(linear_model(), single)
    stream = StreamedBatches(view, shuffle_buffer_size=128)
    assert [(block.data_start, block.data_stop) for block in stream.blocks] == [
        (start, min(start + 300, 1500)) for start in range(0, 1500, 300)
    ]
    firsts = []
    real_read = StreamedBatches._read

    def recording_read(self, block, *args):
        firsts.append(block.data_start)
        return real_read(self, block, *args)

    monkeypatch.setattr(StreamedBatches, "_read", recording_read)
    sampler = CaptionSampler(torch.arange(1500), torch.arange(1500), "all", seed=0)
    source = BatchSource(view)
    for number in range(3):
        batches_of_epoch = epoch(stream, sampler, number, 100)
        assert sorted(torch.cat([rows for rows, _ in batches_of_epoch]).tolist()) == list(range(1500))
        assert_same_batch(source.fetch(batches_of_epoch[3][0]), batches_of_epoch[3][1])
    orders = [firsts[5 * number : 5 * number + 5] for number in range(3)]
    assert all(sorted(order) == [0, 300, 600, 900, 1200] for order in orders)
    assert len({tuple(order) for order in orders}) == 3


def test_stream_honours_index_mappings_and_caption_sampling(captions_cache):
    model = AlignerModel.from_feature_dims(64, 48, projection_dim=8)
    # a contiguous select (a slice of the shards) then a shuffled subset (an index mapping over the table)
    subset = captions_cache.select(range(30, 330)).select(np.random.default_rng(0).permutation(300)[:240])
    view = features_for(model, subset)
    source = BatchSource(view)
    ids = source.image_ids
    stream = StreamedBatches(view, shuffle_buffer_size=50)
    assert torch.equal(stream.image_ids, ids)
    for sampling in ("per_epoch", "first", "all"):
        sampler = CaptionSampler(torch.arange(240), ids, sampling, seed=2)
        for number in (0, 1):
            batches_of_epoch = epoch(stream, sampler, number, 32, with_image_ids=True)
            rows = torch.cat([rows for rows, _ in batches_of_epoch])
            # the epoch's rows as the sampler draws them (one caption per image unless "all"), each once
            assert sorted(rows.tolist()) == sorted(sampler.epoch_rows(number).tolist())
            assert len(batches_of_epoch) == math.ceil(sampler.rows_per_epoch / 32)
            if sampling != "all":
                assert len(set(ids[rows].tolist())) == len(rows) == len(set(ids.tolist()))
            for batch_rows, batch in batches_of_epoch:
                assert_same_batch(source.fetch(batch_rows, with_image_ids=True), batch)
                # the right cache rows: row r of the subset is the table row the two selects point at
                assert torch.equal(batch["image_ids"], ids[batch_rows])
    # rows by index (validation, init_from_data): in any order, repeated, as BatchSource gives them
    for rows in (torch.tensor([239, 0, 17, 17, 120]), torch.randperm(240, generator=torch.Generator().manual_seed(0))):
        assert_same_batch(source.fetch(rows, with_image_ids=True), stream.fetch(rows, with_image_ids=True))
    assert "image_ids" not in stream.fetch(torch.tensor([3]))


def test_resumed_epoch_replays_the_stream_to_its_position(task_cache):
    view = features_for(linear_model(), task_cache.select(range(100, 1400)))
    stream = StreamedBatches(view, shuffle_buffer_size=300)
    sampler = CaptionSampler(torch.arange(1300), torch.arange(1300), "all", seed=9)
    full = epoch(stream, sampler, 3, 50)
    assert len(full) == 26
    for start in (1, 7, 20, 25):  # within the buffer's draws and within the final drain
        resumed = epoch(stream, sampler, 3, 50, start=start)
        assert len(resumed) == 26 - start
        for (rows_a, batch_a), (rows_b, batch_b) in zip(full[start:], resumed):
            assert torch.equal(rows_a, rows_b)
            assert_same_batch(batch_a, batch_b)


def test_non_finite_rows_are_refused_as_their_batch_is_read(tmp_path):
    vision = torch.randn(40, 6)
    vision[13, 2] = float("inf")
    cache = sharded(features_from_tensors({0: vision}, {0: torch.randn(40, 5)}), tmp_path / "cache")
    view = features_for(AlignerModel.from_feature_dims(6, 5, projection_dim=2), cache)
    stream = StreamedBatches(view, shuffle_buffer_size=8)
    sampler = CaptionSampler(torch.arange(40), torch.arange(40), "all", seed=0)
    with pytest.raises(ValueError, match=r"NaN or Inf in vision_features of 1 row\(s\), e.g. rows \[13\]"):
        epoch(stream, sampler, 0, 4)
    with pytest.raises(ValueError, match=r"NaN or Inf in vision_features of 1 row\(s\), e.g. rows \[13\]"):
        stream.fetch(torch.tensor([2, 13, 30]))
    assert stream.fetch(torch.tensor([2, 12, 30]))["vision_features"].shape == (3, 6)


# ---------------------------------------------------------------------------------------------- training
def test_streamed_training_reaches_the_held_out_retrieval_of_in_memory_training(task_cache):
    train_features, test_features = task_cache.select(range(1000)), task_cache.select(range(1000, 1500))
    recalls = {False: [], True: []}
    for seed in (0, 1):
        for stream in (False, True):
            model = linear_model(seed)
            args = AlignmentArguments(
                num_train_epochs=15,
                per_device_train_batch_size=250,
                learning_rate=3e-3,
                seed=seed,
                stream_features=stream,
                shuffle_buffer_size=500,
            )
            result = train(model, train_features, args)
            assert result.global_step == 15 * math.ceil(900 / 250)  # the same steps per epoch either way
            recalls[stream].append(evaluate_retrieval(model, dataset=test_features)["mean_R@1"])
    # 500 held-out pairs, chance 0.2%. Measured (seeds 0-5): in memory 45.8 51.4 50.5 50.4 44.5 47.5 (mean 48.4),
    # streamed 47.0 52.5 50.0 50.1 44.0 48.2 (mean 48.6): the seed moves R@1 by ~7 points, the batch order by ~1.
    assert min(recalls[True]) > 40.0
    assert max(abs(a - b) for a, b in zip(recalls[False], recalls[True])) < 4.0
    assert abs(np.mean(recalls[False]) - np.mean(recalls[True])) < 2.0


def test_streamed_resume_mid_epoch_equals_the_uninterrupted_run(task_cache, tmp_path, stop_training_after):
    features = task_cache.select(range(400))

    def run(out, die_at=None):
        torch.manual_seed(0)
        # dropout: a resumed run only matches if the RNG state is restored with the checkpoint
        model = AlignerModel.from_feature_dims(64, 48, method="mlp", projection_dim=8, hidden_dim=16, dropout=0.3)
        args = AlignmentArguments(
            output_dir=out,
            max_steps=14,
            per_device_train_batch_size=32,  # 320 training rows: 10 batches per epoch
            eval_fraction=0.2,
            eval_steps=4,
            save_steps=4,
            logging_steps=4,
            learning_rate=5e-3,
            seed=3,
            stream_features=True,
            shuffle_buffer_size=100,
            resume_from_checkpoint="latest",
        )
        if die_at is not None:
            stop_training_after(model, die_at)
        train(model, features, args)
        return model

    reference = run(str(tmp_path / "reference"))
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "resumed"), die_at=7)
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-4")  # batch 4 of epoch 0
    resumed = run(str(tmp_path / "resumed"))
    assert os.path.isfile(tmp_path / "resumed" / "model.safetensors")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------- the decision
def test_automatic_choice_streams_when_memory_is_short_and_says_so(task_cache, monkeypatch, caplog):
    view = features_for(linear_model(), task_cache)
    needed = 1500 * (64 + 48) * 4  # 672,000 bytes of float32 features
    monkeypatch.setattr(batches, "_available_memory", lambda: 4 * needed)
    with caplog.at_level(logging.INFO, logger="hf_align.training.streamed_batches"):
        source = training_batches(view)
    assert isinstance(source, BatchSource) and source.preloaded
    assert "training batches: held in memory: their pooled features take 0.000626 GiB as float32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(batches, "_available_memory", lambda: 4 * needed - 4)
    with caplog.at_level(logging.INFO, logger="hf_align.training.streamed_batches"):
        stream = training_batches(view, shuffle_buffer_size=256)
    assert isinstance(stream, StreamedBatches) and stream.shuffle_buffer_size == 256
    assert (
        "training batches: streamed from 4 Arrow file part(s) in 4 shuffled blocks through a shuffle buffer of 256 "
        "rows: their pooled features take 0.000626 GiB as float32 (available memory: 0.0025 GiB) (more than a "
        "quarter)"
    ) in caplog.text
    # train() makes the same choice: a short run with little memory streams its batches
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_align.training.streamed_batches"):
        result = train(linear_model(), task_cache, AlignmentArguments(max_steps=3, per_device_train_batch_size=64))
    assert result.global_step == 3 and "training batches: streamed from 4 Arrow file part(s)" in caplog.text
    # stream_features=False holds them in memory whatever the budget
    assert isinstance(training_batches(view, stream_features=False), BatchSource)
    # too large, but a cache built in memory has no files to stream from: held in memory, with a warning
    in_memory = features_for(linear_model(), make_paired_task(1500, seed=0).to_features())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_align.training.streamed_batches"):
        assert isinstance(training_batches(in_memory), BatchSource)
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert (
        "training batches: held in memory although their pooled features take 0.000626 GiB as float32 (available "
        "memory: 0.0025 GiB), more than a quarter: cannot stream: its rows are not all read from Arrow files on disk"
    ) in caplog.text


def test_bad_streaming_arguments_are_refused(task_cache):
    with pytest.raises(ValueError, match=r"^shuffle_buffer_size must be a positive int, got 0$"):
        AlignmentArguments(shuffle_buffer_size=0)
    with pytest.raises(ValueError, match=r"^shuffle_buffer_size must be a positive int, got 2.5$"):
        AlignmentArguments(shuffle_buffer_size=2.5)
    with pytest.raises(ValueError, match=r"^stream_features must be None \(automatic\), True or False, got 'yes'$"):
        AlignmentArguments(stream_features="yes")
    view = features_for(linear_model(), task_cache)
    with pytest.raises(ValueError, match=r"^shuffle_buffer_size must be a positive int, got -1$"):
        StreamedBatches(view, shuffle_buffer_size=-1)
    # a cache built in memory has no files to stream from
    in_memory = make_paired_task(50, seed=0).to_features()
    with pytest.raises(
        ValueError,
        match=r"^stream_features=True, but this feature cache cannot be streamed: its rows are not all read from "
        r"Arrow files on disk \(an in-memory table",
    ):
        train(linear_model(), in_memory, AlignmentArguments(stream_features=True, max_steps=1))
    # a column added in memory: the table's rows are no longer rows of the files alone
    added = task_cache.add_column("weight", [1.0] * 1500)
    with pytest.raises(ValueError, match=r"cannot be streamed: .* or columns joined from several tables\)$"):
        training_batches(features_for(linear_model(), added), stream_features=True)
    # a table cast in place (what casting to an Image or Audio feature does): the files no longer hold what it shows
    schema = task_cache.data.schema
    target = schema.set(schema.get_field_index("label"), schema.field("label").with_type(pa.int32()))
    features = datasets.Features.from_arrow_schema(target)
    cast = datasets.Dataset(task_cache.data.cast(target), info=datasets.DatasetInfo(features=features))
    with pytest.raises(ValueError, match=r"cannot be streamed: its table was changed by cast\(\), which cannot be"):
        training_batches(features_for(linear_model(), cast), stream_features=True)
    # token features are not streamed
    tokens = make_paired_task(20, vision_dim=6, text_dim=5, tokens=True, n_patches=3, max_text_tokens=4, seed=0)
    model = AlignerModel.from_feature_dims(6, 5, method="token_relative", num_anchors=2)
    with pytest.raises(
        ValueError, match=r"^stream_features=True streams pooled features only, and this model reads token features"
    ):
        train(model, tokens.to_features(), AlignmentArguments(stream_features=True, max_steps=1))


# ---------------------------------------------------------------------------------------------- two processes
GLOBAL_BATCH = 64


def _run_in_every_process(workdir: str) -> None:
    """What each process of the runs below does: train streamed on the sharded cache, the main process saving the
    weights."""
    from accelerate.utils import set_seed
    from safetensors.torch import save_file

    from hf_align.utils.distributed import process_state

    state = process_state()
    world = state.num_processes
    set_seed(0)
    model = AlignerModel.from_feature_dims(
        64, 48, projection_dim=16, learnable_temperature=True, structure_weight=1.0, structure_warmup_steps=0
    )
    args = AlignmentArguments(
        max_steps=8,  # 270 training rows: 5 global batches per epoch (the last of 14), so 8 steps cross an epoch
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        eval_steps=4,
        save_model=False,
        seed=0,
        mixed_precision="no",
        stream_features=True,
        shuffle_buffer_size=100,
    )
    train(model, datasets.load_from_disk(os.path.join(workdir, "cache")), args)
    if state.is_main_process:
        weights = {k: v.contiguous() for k, v in model.aligner_state_dict().items()}
        save_file(weights, os.path.join(workdir, f"weights-{world}.safetensors"))


@pytest.mark.slow
def test_two_processes_stream_the_global_batches_of_one_process(tmp_path):
    from safetensors.torch import load_file

    make_paired_task(300, seed=3).to_features().save_to_disk(str(tmp_path / "cache"), num_shards=4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), __file__, str(tmp_path)]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in (launch, [sys.executable, __file__, str(tmp_path)])
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-6000:]
    single, split = (load_file(str(tmp_path / f"weights-{world}.safetensors")) for world in (1, 2))
    assert sorted(single) == sorted(split)
    torch.manual_seed(0)
    initial = AlignerModel.from_feature_dims(64, 48, projection_dim=16, learnable_temperature=True)
    start = initial.aligner_state_dict()["aligner.vision_head.weight"]
    assert (single["aligner.vision_head.weight"] - start).abs().max() > 1e-2  # it trained
    for name in single:
        # every process read the same stream: up to the rounding of a different reduction order, one run
        torch.testing.assert_close(split[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    _run_in_every_process(sys.argv[1])

"""RPT's tuning data: every clean sample once per epoch and each augmented candidate (AugMix views of the
originals and of their DeepAugment copies) with probability a, drawn from (seed, epoch, key); the feature
cache keeps K versions of each sample and every epoch reads one of them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cluster.engine import batch as B
from cluster.engine.streams import generated_copy_key, generated_stream
from cluster.jobs.rpt import AugmentedConfig, CachedRows, RptRows
from robust.augment import augmix_transform
from robust.data.shards import FEATS, LABEL, write_shards
from robust.rpt.targets import augmented_view, draw_augmented
from robust.seeding import sample_seeds

N = 600  # originals, and as many DeepAugment copies


def _batch(seed: int, epoch: int, *, n: int = N, invalid: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    keys = np.array([f"k{i:04d}" for i in range(n)] + [f"da0-k{i:04d}" for i in range(n)])
    epochs = np.full(2 * n, epoch)
    valid = np.ones(2 * n, dtype=bool)
    valid[list(invalid)] = False
    images = np.random.default_rng(epoch).integers(0, 256, (2 * n, 16, 16, 3), dtype=np.uint8)
    return B.build({B.KEY: keys, B.EPOCH: epochs, B.SEED: sample_seeds(seed, epochs, keys), B.VALID: valid,
                    B.SKIP_REASON: np.where(valid, "", "bad"), B.LABEL: np.arange(2 * n) % 10, B.IMAGE: images})


def _within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_each_candidate_is_drawn_with_probability_a_from_its_seed():
    seeds = sample_seeds(0, np.zeros(20_000, np.int64), [f"aug-k{i}" for i in range(20_000)])
    for a in (0.1, 0.5, 0.9):
        drawn = draw_augmented(seeds, fraction=a)
        assert _within_binomial(int(drawn.sum()), len(seeds), a)
        assert np.array_equal(drawn, draw_augmented(seeds, fraction=a))  # reproducible
    assert draw_augmented(seeds, fraction=1.0).all() and not draw_augmented(seeds, fraction=0.0).any()
    # nested: a larger fraction keeps every sample a smaller one kept
    assert not (draw_augmented(seeds, fraction=0.3) & ~draw_augmented(seeds, fraction=0.6)).any()
    other = sample_seeds(0, np.ones(20_000, np.int64), [f"aug-k{i}" for i in range(20_000)])
    both = draw_augmented(seeds, fraction=0.5) & draw_augmented(other, fraction=0.5)
    assert _within_binomial(int(both.sum()), len(seeds), 0.25)  # another epoch draws independently
    with pytest.raises(ValueError, match="fraction"):
        draw_augmented(seeds, fraction=1.5)


def test_rows_are_every_original_clean_and_a_share_a_of_augmix_and_deepaugment_candidates():
    a, seed = 0.3, 7
    batch = _batch(seed, epoch=2, invalid=(5,))
    out = RptRows(AugmentedConfig(fraction=a), fraction=a, seed=seed)(batch)
    clean, aug = out[B.KEY][~out[B.AUGMENTED]], out[B.KEY][out[B.AUGMENTED]]
    assert clean.tolist() == batch[B.KEY][:N].tolist()  # every original once (the placeholder too), in order
    assert np.array_equal(out[B.IMAGE][~out[B.AUGMENTED]], batch[B.IMAGE][:N])  # the crop as it came
    from_originals = [k for k in aug if not k.startswith("aug-da0-")]
    from_copies = [k for k in aug if k.startswith("aug-da0-")]
    assert "aug-k0005" not in from_originals  # no candidate from a placeholder
    assert _within_binomial(len(from_originals), N - 1, a) and _within_binomial(len(from_copies), N, a)
    # a candidate follows the row it was made from, seeded by (seed, epoch, its own key)
    at = {k: i for i, k in enumerate(out[B.KEY])}
    assert all(at[k] == at[k.removeprefix("aug-")] + 1 for k in from_originals)
    i = at[from_copies[0]]
    assert out[B.SEED][i] == sample_seeds(seed, [2], [from_copies[0]])[0] and out[B.LABEL][i] == \
        batch[B.LABEL][list(batch[B.KEY]).index(from_copies[0].removeprefix("aug-"))]
    source = batch[B.IMAGE][list(batch[B.KEY]).index(from_copies[0].removeprefix("aug-"))]
    view = augmented_view(source, augmix_transform(AugmentedConfig().augmix), seed=int(out[B.SEED][i]))
    assert np.array_equal(out[B.IMAGE][i], view) and not np.array_equal(view, source)  # its AugMix view
    # reproducible; another epoch draws another share
    assert np.array_equal(RptRows(AugmentedConfig(fraction=a), fraction=a, seed=seed)(batch)[B.KEY], out[B.KEY])
    later = RptRows(AugmentedConfig(fraction=a), fraction=a, seed=seed)(_batch(seed, epoch=3, invalid=(5,)))
    assert set(later[B.KEY][later[B.AUGMENTED]]) != set(aug)


def test_sources_choose_the_candidates_and_a_pass_without_augmented_methods_gets_clean_rows_only():
    batch = _batch(0, epoch=0, n=50)
    only_da = RptRows(AugmentedConfig(sources=["deepaugment"]), fraction=1.0, seed=0)(batch)
    aug = only_da[B.AUGMENTED]
    assert all(k.startswith("aug-da0-") for k in only_da[B.KEY][aug]) and aug.sum() == 50
    copies = [list(batch[B.KEY]).index(k.removeprefix("aug-")) for k in only_da[B.KEY][aug]]
    assert np.array_equal(only_da[B.IMAGE][aug], batch[B.IMAGE][copies])  # no AugMix: the copy's crop itself
    originals = {k: v[:50] for k, v in batch.items()}
    only_augmix = RptRows(AugmentedConfig(sources=["augmix"]), fraction=1.0, seed=0)(originals)
    assert only_augmix[B.AUGMENTED].sum() == 50 and len(only_augmix[B.KEY]) == 100
    clean = RptRows(AugmentedConfig(), fraction=0.0, seed=0)(batch)
    assert not clean[B.AUGMENTED].any() and clean[B.KEY].tolist() == batch[B.KEY][:50].tolist()


def test_a_training_key_that_looks_augmented_is_refused():
    batch = _batch(0, epoch=0, n=4)
    batch[B.KEY] = np.array(["aug-x", *batch[B.KEY][1:]])
    with pytest.raises(ValueError, match="starts with 'aug-'"):
        RptRows(AugmentedConfig(), fraction=0.5, seed=0)(batch)


def test_the_cached_rows_draw_the_samples_the_uncached_stream_draws():
    # the cache holds every candidate (fraction 1); reading it, an epoch keeps what RptRows would have drawn
    a, seed = 0.4, 3
    batch = _batch(seed, epoch=1, n=200)
    everything = RptRows(AugmentedConfig(), fraction=1.0, seed=seed)(batch)
    cached = CachedRows(a)({k: v for k, v in everything.items() if k != B.AUGMENTED})
    direct = RptRows(AugmentedConfig(), fraction=a, seed=seed)(batch)
    assert cached[B.KEY].tolist() == direct[B.KEY].tolist()
    assert np.array_equal(cached[B.AUGMENTED], direct[B.AUGMENTED])


def test_each_epoch_reads_one_of_the_cached_versions_per_sample(ray_cluster, tmp_path):
    copies, n = 3, 60
    # version c of every sample holds the features (c, c)
    samples = [{"__key__": generated_copy_key(c, f"k{i:03d}"), LABEL: i % 10, FEATS: np.full(2, c, np.float32)}
               for c in range(copies) for i in range(n)]
    write_shards(samples, tmp_path / "cache", prefix="gen", max_per_shard=50, num_classes=10)

    def read(seed: int) -> dict[int, dict[str, int]]:
        rows: dict[int, dict[str, int]] = {0: {}, 1: {}}
        ds = generated_stream(tmp_path / "cache", columns=[B.FEATS], epochs=2, seed=seed, batch_size=16, copies=copies)
        for batch in ds.iter_batches(batch_size=None):
            for key, epoch, feats, label in zip(batch[B.KEY], batch[B.EPOCH], batch[B.FEATS], batch[B.LABEL]):
                assert key not in rows[int(epoch)] and label == int(key[1:]) % 10  # one version per sample and epoch
                rows[int(epoch)][str(key)] = int(feats[0])
        return rows

    first = read(0)
    assert all(sorted(first[e]) == [f"k{i:03d}" for i in range(n)] for e in (0, 1))  # the sample's own key
    changed = sum(first[0][k] != first[1][k] for k in first[0])
    assert _within_binomial(changed, n, 1 - 1 / copies)  # two epochs read different versions
    assert all(_within_binomial(list(first[0].values()).count(c), n, 1 / copies) for c in range(copies))
    assert read(0) == first  # the same seed reads the same ones
    assert read(1) != first

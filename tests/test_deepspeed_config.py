import pytest

from cluster.engine.deepspeed_config import OptimConfig, deepspeed_config


def test_config_follows_the_typed_config():
    cfg = OptimConfig(zero_stage=3, micro_batch_size=16, grad_accum=4, lr=1e-3, grad_clip=0.5, warmup_epochs=2.5,
                      warmup_start_ratio=0.01)
    ds = deepspeed_config(cfg, world_size=2, total_steps=100, steps_per_epoch=4, on_gpu=False)
    assert ds["train_batch_size"] == 16 * 4 * 2
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-3
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["warmup_min_ratio"]) == (100, 10, 0.01)
    assert deepspeed_config(cfg, world_size=1, total_steps=5, steps_per_epoch=4, on_gpu=True)["bf16"] == {"enabled": True}
    # warm-up never reaches past the run
    short = deepspeed_config(cfg, world_size=1, total_steps=5, steps_per_epoch=4, on_gpu=False)
    assert short["scheduler"]["params"]["warmup_num_steps"] == 4


@pytest.mark.parametrize("bad, match", [(dict(zero_stage=4), "zero_stage"), (dict(grad_accum=0), "grad_accum"),
                                        (dict(ema_decay=0.99, zero_stage=3), "zero_stage <= 2"),
                                        (dict(warmup_epochs=-1), "warmup_epochs")])
def test_bad_configs_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_config(OptimConfig(**bad), world_size=1, total_steps=10, steps_per_epoch=5, on_gpu=False)

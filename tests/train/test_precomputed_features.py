"""``--teacher-features precomputed``: the official recipe ``deit-ti_c100_ours_offline`` end to
end at a tiny size (fake CIFAR-100 on disk in its real format, 32 px, a ResNet-56 teacher
checkpoint made here), the maps the engine reads against an independent computation (the
teacher's blocks on the un-augmented images, cropped per sample by a naive per-pixel crop), the
cache command, and the refusal of a stale cache."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from spacedkd_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from spacedkd_fast.engine.model_io import unwrap
from spacedkd_fast.models import create
from spacedkd_fast.models.block_features import block_features
from spacedkd_fast.train import cache_features, cli
from spacedkd_fast.train.build import _build_data, build_run
from spacedkd_fast.train.checkpoint import BEST_NAME, save_best_student
from spacedkd_fast.train.config import ConfigError, build_config, load_yaml
from spacedkd_fast.train.distributed import init_distributed
from spacedkd_fast.train.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_data_fakes import write_cifar100  # noqa: E402
from test_feature_cache import naive_crop  # noqa: E402

RECIPE = "deit-ti_c100_ours_offline"
N_TRAIN, BATCH = 16, 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(folder: Path, seed: int) -> str:
    folder.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    model = create("resnet56", 100, 32)
    save_best_student(folder, state_dict=model.state_dict(), arch="resnet56", num_classes=100,
                      image_size=32, epoch=1, top1=0.0)
    return str(folder / BEST_NAME)


@pytest.fixture
def setup(tmp_path):
    data_dir = tmp_path / "data"
    write_cifar100(data_dir, n_train=N_TRAIN, n_test=8)
    teacher = _teacher(tmp_path / "teacher", seed=1)
    flags = dict(data_dir=str(data_dir), teacher_checkpoint=teacher, image_size=32,
                 batch_size=BATCH, epochs=1, warmup_epochs=0, device="cpu", log_every=1,
                 out=str(tmp_path / "run"))
    return tmp_path, flags


def _cfg(flags, **over):
    return build_config(load_yaml(RECIPE), {**flags, **over})


def _argv(flags, **over) -> list[str]:
    values = {**flags, **over}
    argv = ["--config", RECIPE]
    for k, v in values.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def test_the_recipe_reads_cropped_cached_maps_and_never_runs_the_teacher(setup, capsys):
    tmp_path, flags = setup
    cfg = _cfg(flags)
    parts = build_run(cfg, init_distributed("cpu"))  # builds the cache (none yet)
    assert "computing them once" in capsys.readouterr().err
    folder = cache_features.cache_folder(cfg, parts.data)
    assert (folder / "manifest.json").is_file()
    assert folder.parent == Path(flags["teacher_checkpoint"]).parent / "teacher_maps"

    teacher = unwrap(parts.teacher).model  # ResizedInput -> the loaded ResNet-56
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    seen = []
    stand_in = parts.distiller.teacher
    stand_in.register_forward_hook(lambda m, a, out: seen.append(out[0]))

    # independent: the teacher's blocks on the un-augmented, ImageNet-normalised 32 px images
    images = parts.data.train.images.double() / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    teacher.eval()
    with torch.no_grad():
        full = block_features(teacher, ((images - mean) / std).float(), indices=[0, 1, 2])
    teacher.train()
    assert [tuple(m.shape[1:]) for m in full] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    calls.clear()

    source = parts.source
    keyed = parts.data.train
    for key, (x, y) in source.epoch(0):
        parts.distiller.step(key, x, y)
        idx, p = keyed.params(key)
        n = len(idx)
        top, left, h, w, flip = keyed.augmenter.crop_geometry(p, torch.full((n,), 32),
                                                              torch.full((n,), 32))
        got = seen[-1]
        for k, m in enumerate(full):
            # float32 maps of the same model (normalisation and batch differ): 1e-5 of the scale
            atol = 1e-5 * float(m.abs().max())
            for b in (0, n - 1):  # two samples of each batch (a naive crop is slow)
                want = naive_crop(m[idx[b]].double().numpy(), int(top[b]), int(left[b]),
                                  int(h[b]), int(w[b]), bool(flip[b]), 32, 32)
                np.testing.assert_allclose(got[k][b].numpy(), want, rtol=0, atol=atol,
                                           err_msg=f"key {key}, block {k}, sample {b}")
    assert len(seen) == N_TRAIN // BATCH and calls == []  # maps every step, no teacher forward
    stats = parts.distiller.pop_stats()
    assert np.isfinite(stats["feat"]) and stats["feat"] > 0


def test_the_recipe_runs_end_to_end_and_a_stale_cache_is_refused(setup, capsys):
    tmp_path, flags = setup
    assert cache_features.main(_argv(flags)) == 0  # the command builds the cache
    out = capsys.readouterr().out
    assert "built:" in out and "[(16, 32, 32), (32, 16, 16), (64, 8, 8)]" in out
    assert cache_features.main(_argv(flags) + ["--verify"]) == 0
    assert "up to date" in capsys.readouterr().out

    assert cli.main(_argv(flags)) == 0
    err = capsys.readouterr().err
    assert "computing them once" not in err
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["teacher_features"] == "precomputed" and saved["alpha"] == 0.0
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # header, epoch 1

    # another teacher in the same file: the cache is stale, refused in one line (exit 2)
    _teacher(tmp_path / "teacher", seed=2)
    assert cli.main(_argv(flags, out=str(tmp_path / "run2"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is stale: teacher_sha256" in err
    assert "cache_features --rebuild" in err
    assert not (tmp_path / "run2").exists()
    assert cache_features.main(_argv(flags)) == 2  # the command refuses it too ...
    assert "add --rebuild" in capsys.readouterr().err
    assert cache_features.main(_argv(flags) + ["--rebuild", "--cache-dtype", "float16"]) == 0
    assert "float16" in capsys.readouterr().out  # ... and replaces it on request
    parts = build_run(_cfg(flags, out=str(tmp_path / "run2")), init_distributed("cpu"))
    assert parts.source.cache.dtype == "float16"  # the run takes the rebuilt cache


def test_precomputed_maps_have_no_teacher_logits_and_need_a_frozen_teacher(setup):
    _, flags = setup
    with pytest.raises(ConfigError, match="no teacher logits: use --alpha 0"):
        _cfg(flags, alpha=0.5)
    with pytest.raises(ConfigError, match="use --mode frozen"):
        _cfg(flags, mode="online", teacher_checkpoint=None)
    with pytest.raises(ConfigError, match="cannot read precomputed teacher maps"):
        _cfg(flags, cuda_graphs="on", device="cuda", finite_check_every=4, compat="none")
    cfg = _cfg(flags, augment="cifar")
    with pytest.raises(UserError, match="padded crop and a rotation"):
        build_run(cfg, init_distributed("cpu"))
    with pytest.raises(UserError, match="needs a data set held in memory"):
        cache_features.keyed_source(SimpleNamespace(train=SimpleNamespace(augmenter=None)))
    cfg = _cfg(flags)
    data = _build_data(cfg, init_distributed("cpu"))
    with pytest.raises(UserError, match="build them first with python -m spacedkd_fast.train.cac"):
        cache_features.open_cache(cfg, data, None, world_size=2)  # ranks never build it

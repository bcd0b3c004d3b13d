"""ShardStream writes safetensors files tensor by tensor (no output buffered in memory): what the safetensors
library reads back must be exactly what went in, for every dtype, split at the size limit, and when a shard has
more tensors than its reserved header space holds."""
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from msmodelslim.format.shards import SAFETENSORS_DTYPES, ShardStream


def read_back(out_dir, weight_map):
    found = {}
    for name in sorted(set(weight_map.values())):
        found.update(load_file(out_dir / name))
    return found


def sample_tensors():
    torch.manual_seed(0)
    base = torch.randn(8, 6)
    tensors = {f"t.{str(dtype).removeprefix('torch.')}": (base * 10).to(dtype) for dtype in SAFETENSORS_DTYPES}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["view_of_shared_storage"] = base[2:4, 1:]  # non-contiguous view of a bigger storage
    tensors["again_same_storage"] = base  # the storage the view came from, written too
    return tensors


@pytest.mark.parametrize("limit", [0, 200, 1 << 30])
def test_round_trip_every_dtype_and_split_at_the_limit(tmp_path, limit):
    stream, tensors = ShardStream(tmp_path, limit), sample_tensors()
    for name, tensor in tensors.items():
        stream.add(name, tensor)
    weight_map = stream.finish(lambda i, n: f"part-{i}-of-{n}.safetensors", "index.json")
    back = read_back(tmp_path, weight_map)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    files = set(weight_map.values())
    assert len(files) == (1 if limit in (0, 1 << 30) else len(files)) and (limit != 200 or len(files) > 3)
    with safe_open(tmp_path / sorted(files)[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert stream.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not list(tmp_path.glob(".shard-*"))


def test_a_header_larger_than_its_reserve_is_moved_in_front(tmp_path):
    stream = ShardStream(tmp_path, 1 << 20)  # reserve 64 KiB: ~400 long names overflow it
    assert stream.reserve == 64 << 10
    tensors = {f"model.layers.{i}.mlp.experts.{i}.down_proj.weight_scale_with_a_long_name": torch.full((2,), float(i))
               for i in range(1000)}
    for name, tensor in tensors.items():
        stream.add(name, tensor)
    back = read_back(tmp_path, stream.finish(lambda i, n: "one.safetensors", None))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_twice_the_same_name_is_refused(tmp_path):
    stream = ShardStream(tmp_path, 0)
    stream.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        stream.add("a", torch.zeros(2))


def _peak_rss_mib_writing(out_dir, tensors: int) -> int:
    """Peak RSS of a fresh process that streams `tensors` x 32 MiB into one shard."""
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from msmodelslim.format.shards import ShardStream\n"
        "stream = ShardStream(Path(sys.argv[1]), 0)\n"
        "for i in range(int(sys.argv[2])):\n"
        "    stream.add(f'w{i}', torch.full((8 << 20,), float(i)))\n"
        "stream.finish(lambda i, n: 'big.safetensors', None)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir), str(tensors)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_memory_does_not_grow_with_the_shard(tmp_path):
    """Writing 3.2 GiB instead of 0.4 GiB into one shard must not raise the peak RSS by more than a few tensors
    (a writer that buffered the shard would add 2.8 GiB)."""
    small = _peak_rss_mib_writing(tmp_path / "small", 12)
    large = _peak_rss_mib_writing(tmp_path / "large", 100)
    assert large - small < 300, f"peak RSS {small} MiB for 0.4 GiB written, {large} MiB for 3.2 GiB"
    with safe_open(tmp_path / "large" / "big.safetensors", "pt") as f:
        assert float(f.get_tensor("w99")[0]) == 99.0

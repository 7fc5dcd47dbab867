"""python -m ring_jax.convert {from-hf,to-hf} --src SRC --dst DST [--dtype D] [--overwrite] [...]

to-hf reads a ring_jax model checkpoint (from-hf output) or a training workdir (a saved step: --step, default the
latest complete one)."""

from __future__ import annotations

import argparse
import sys

from ring_jax.config import SUPPORTED_DTYPES
from ring_jax.convert.api import DEFAULT_MAX_SHARD_SIZE, checkpoint_to_hf, hf_to_checkpoint
from ring_jax.errors import RingJaxError
from ring_jax.sharding import MESH_AXES, make_mesh
from ring_jax.train.checkpoint import is_workdir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ring_jax.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from_hf = commands.add_parser("from-hf", help="HF directory -> ring_jax (Orbax) checkpoint")
    to_hf = commands.add_parser("to-hf", help="ring_jax checkpoint or training workdir -> HF directory (safetensors + "
                                "config.json)")  # fmt: skip
    for sub in (from_hf, to_hf):
        sub.add_argument("--src", required=True, help="source directory")
        sub.add_argument("--dst", required=True, help="destination directory (must not exist unless --overwrite)")
        sub.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None, help="weight dtype (default: keep)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing destination")
        sub.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    from_hf.add_argument(
        "--mesh",
        type=mesh_sizes,
        default=None,
        help="place tensors on a device mesh while converting, e.g. 'fsdp=8' or 'fsdp=4,tensor=2' "
        f"(axes {', '.join(MESH_AXES)}; unnamed axes 1): host memory then holds about one tensor at a time",
    )
    from_hf.add_argument(
        "--decay-layer-offset",
        type=int,
        default=None,
        help="lightning decay offset δ stored in the config (docs/architecture.md#decay)",
    )
    to_hf.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB, 2GiB")
    to_hf.add_argument("--step", type=int, default=None, help="of a training workdir (default: the latest saved)")
    return parser.parse_args(argv)


def mesh_sizes(spec: str) -> tuple[int, ...]:
    """'fsdp=4,tensor=2' -> sizes over MESH_AXES (unnamed axes 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in spec.split(","):
        axis, _, size = item.partition("=")
        if axis.strip() not in sizes or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected AXIS=SIZE items with AXIS in {MESH_AXES}")
        sizes[axis.strip()] = int(size)
    return tuple(sizes.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "from-hf":
            overrides = {} if args.decay_layer_offset is None else {"decay_layer_offset": args.decay_layer_offset}
            hf_to_checkpoint(
                args.src,
                args.dst,
                dtype=args.dtype,
                overrides=overrides,
                mesh=make_mesh(args.mesh) if args.mesh else None,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        elif is_workdir(args.src):
            from ring_jax.train.export import workdir_to_hf

            step = workdir_to_hf(args.src, args.dst, step=args.step, dtype=args.dtype,
                                 max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                 progress=not args.no_progress)  # fmt: skip
            print(f"step {step} of {args.src}:", end=" ")
        elif args.step is not None:
            raise FileNotFoundError(f"{args.src}: --step needs a training workdir (checkpoints/ and config.json)")
        else:
            checkpoint_to_hf(
                args.src,
                args.dst,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except (RingJaxError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`cache info` and `cache clean`: the code cache and the exported engines."""

from __future__ import annotations

import click

from transferkit.cli import cli


@cli.group()
def cache() -> None:
    """The code cache: codes of images already encoded, keyed by model, weights, layer, pooling, transform
    and image content ($TRANSFERKIT_CACHE, default ~/.cache/transferkit)."""


@cache.command("info")
@click.option("-v", "--verbose", "details", is_flag=True, help="One line per kind of codes, too.")
@click.pass_context
def cache_info(ctx: click.Context, details: bool) -> None:
    """What is cached: totals, then one line per model; -v adds one line per kind of codes."""
    from collections import defaultdict

    from transferkit.codes.cache import CodeCache
    from transferkit.probe.sweep_cache import sweep_files

    store = CodeCache()
    entries = store.info()
    engines = store.engines()
    click.echo(f"{len(entries)} kind(s) of codes, {sum(e.rows for e in entries)} rows, "
               f"{sum(e.bytes for e in entries) / 2**20:.1f} MiB in {store.root}")
    click.echo(f"{len(engines)} exported ONNX Runtime engine(s), "
               f"{sum(p.stat().st_size for p in engines) / 2**20:.1f} MiB in {store.root / 'engines'}")
    click.echo(f"{len(sweep_files(store.root))} remembered sweep result(s) in {store.root / 'sweeps'}")
    by_model = defaultdict(list)
    for e in entries:
        by_model[e.spec.get("model", "?")].append(e)
    for model, group in sorted(by_model.items()):
        click.echo(f"  {model}: {len(group)} kind(s), {sum(e.rows for e in group)} rows, "
                   f"{sum(e.bytes for e in group) / 2**20:.1f} MiB")
    if not (details or ctx.find_root().obj.get("verbose")):
        return
    for e in entries:
        s = e.spec
        click.echo(f"{e.path.name[:12]}  {s.get('model', '?')}  {s.get('layer', '?')}|{s.get('pool', '?')}  "
                   f"{(s.get('transform') or {}).get('input_size', '?')}  {s.get('precision', '?')}  "
                   f"{e.rows} images  {e.bytes / 2**20:.1f} MiB")


@cache.command("clean")
@click.option("--model", default=None, help="Only the codes of this model.")
def cache_clean(model: str | None) -> None:
    """Delete cached codes (all, or one model's); without --model the exported engines and remembered sweeps too."""
    from transferkit.codes.cache import CodeCache
    from transferkit.probe.sweep_cache import sweep_files

    store = CodeCache()
    engines = [] if model else store.engines()
    sweeps = [] if model else sweep_files(store.root)  # named by a digest only: a per-model clean leaves them
    gone = store.clear(model)
    for path in sweeps:
        path.unlink(missing_ok=True)
    click.echo(f"deleted {len(gone)} kind(s) of codes, {sum(e.bytes for e in gone) / 2**20:.1f} MiB, "
               f"{len(engines)} engine(s) and {len(sweeps)} sweep result(s) from {store.root}")

"""``salience`` command: list, validate, run notebooks, build the report, prepare the model zoo, store nbval outputs.

    salience list                              notebooks, their parameter sets and last status
    salience validate [NB ...] [--params SET]  check parameter files, run nothing
    salience run [NB ...] [--params SET] [-p key=value ...] [-j N | --scheduler ADDRESS] [--timeout S] [--threads N]
                 [--no-report]
    salience sweep NB [--file F | --sweep NAME | --grid key=v1,v2 ...] [--params SET] [-p key=value ...]
                   [-j N | --scheduler ADDRESS] [--name NAME] [--timeout S] [--threads N] [--no-report]
                                               one run per grid combination, gathered into one table
    salience report [--interactive]            rebuild outputs/report/index.html
    salience zoo prepare [NAME ...]            convert the embedded models into the cache (once)
    salience store NB [NB ...]                 execute a notebook in place on its defaults (the outputs nbval checks)
    salience stability [NB ...] [--threads 1 2]  run on 1 and on 2 threads; exit 1 if any verdict differs
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from .params import DEFAULT_SET, ParamsError, param_sets


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParamsError(f"-p expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)  # YAML typing: 0.1 → float, [1, 2] → list
    return out


def cmd_list(args) -> int:
    from .paths import outputs_dir
    from .runner import available_notebooks

    for name in available_notebooks():
        sets = []
        for s in param_sets(name):
            status = "not run"
            for folder, label in ((f"{s}.failed", "FAILED"), (s, None)):
                record = outputs_dir() / name / folder / "run.json"
                if record.is_file():
                    verdict = (json.loads(record.read_text()).get("verdict") or {}).get("label")
                    status = label or (f"ok, verdict: {verdict}" if verdict else "ok")
                    break
            sets.append(f"{s} ({status})")
        print(f"{name:32s} {', '.join(sets)}")
    return 0


def cmd_validate(args) -> int:
    from .runner import plan

    specs = plan(args.notebooks or None, args.params, _overrides(args.p))
    for spec in specs:
        print(f"ok  {spec.notebook} [{spec.param_set}]")
    return 0


def cmd_run(args) -> int:
    from .runner import plan, run_many, summary

    specs = plan(args.notebooks or None, args.params, _overrides(args.p), args.timeout, args.threads)
    outcomes = run_many(specs, jobs=args.jobs, scheduler=args.scheduler)
    print(summary(outcomes))
    if not args.no_report:
        from .report import build_report

        print(f"report: {build_report()}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def cmd_sweep(args) -> int:
    from .runner import summary
    from .sweep import Sweep, check_name, parse_grid, read_sweep, run_sweep

    grid = parse_grid(args.grid)
    if args.file or args.sweep or not grid:
        sweep = read_sweep(args.notebook, args.file or args.sweep)
        sweep.grid.update(grid)  # --grid adds to, or replaces keys of, the file's grid
        if args.params is not None:
            sweep.base = args.params
    else:
        sweep = Sweep(args.notebook, "-".join(k.replace(".", "-") for k in grid), grid, args.params or DEFAULT_SET)
    sweep.fixed.update(_overrides(args.p))
    if args.name:
        sweep.name = check_name(args.name)
    n = len(sweep.combinations())
    print(f"sweep {sweep.name!r} of {sweep.notebook}: {n} combination{'s' if n != 1 else ''} "
          f"({' x '.join(f'{k}: {len(v)}' for k, v in sweep.grid.items())})")
    result = run_sweep(sweep, jobs=args.jobs, scheduler=args.scheduler, timeout_s=args.timeout, threads=args.threads)
    print(summary(result.outcomes))
    print(f"table: {result.table}")
    if not args.no_report:
        from .report import build_report

        print(f"report: {build_report()}")
    return 0 if all(o.status == "ok" for o in result.outcomes) else 1


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``sweep``: where and how the notebooks execute."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("-j", "--jobs", type=int, default=1, help="notebooks run in parallel local processes")
    where.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="run on the Dask cluster whose scheduler listens at ADDRESS (tcp://host:8786); the "
                            "workers need this project and the same file system")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per notebook (default 900)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads of each notebook's kernel (default: torch's own choice)")
    p.add_argument("--no-report", action="store_true", help="skip rebuilding the HTML report")


def cmd_report(args) -> int:
    from .report import build_report

    print(f"report: {build_report(include_interactive=args.interactive)}")
    return 0


def cmd_zoo(args) -> int:
    from .models import prepare_zoo

    for name, path in prepare_zoo(args.names or None, progress=True).items():
        print(f"{name:18s} {path}")
    return 0


def cmd_store(args) -> int:
    from .notebooks import store_outputs

    for name in args.notebooks:
        print(f"stored {store_outputs(name)}")
    return 0


def cmd_stability(args) -> int:
    from .stability import verdict_stability

    table, stable = verdict_stability(args.notebooks or None, threads=args.threads, timeout_s=args.timeout,
                                      keep=args.keep)
    print(table.to_string(index=False))
    print("verdicts identical across thread counts" if stable else "VERDICTS DIFFER across thread counts")
    return 0 if stable else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salience", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="notebooks, parameter sets, last status").set_defaults(func=cmd_list)
    for name, func, help_ in (("validate", cmd_validate, "check parameter files"), ("run", cmd_run, "run notebooks")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("notebooks", nargs="*", help="notebook names (default: all)")
        p.add_argument("--params", default=DEFAULT_SET, help="parameter set: params/<nb>.<SET>.yaml, or a path to a YAML file (default: the embedded CPU set)")
        p.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
        if name == "run":
            _add_run_options(p)
        p.set_defaults(func=func)
    sweep = sub.add_parser("sweep", help="run a notebook over a grid of parameters and gather one table")
    sweep.add_argument("notebook", help="notebook name")
    source = sweep.add_mutually_exclusive_group()
    source.add_argument("--file", default=None, help="sweep file (YAML: name, params, fixed, grid)")
    source.add_argument("--sweep", default=None, metavar="NAME", help="params/<nb>.<NAME>.sweep.yaml")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a swept parameter and its values (YAML-typed); without --file or --sweep, the whole grid")
    sweep.add_argument("--params", default=None,
                       help="parameter set every combination starts from (default: the file's, else the embedded set)")
    sweep.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="fix one parameter in every run")
    sweep.add_argument("--name", default=None, help="the sweep's folder under outputs/<nb>/sweeps/")
    _add_run_options(sweep)
    sweep.set_defaults(func=cmd_sweep)
    report = sub.add_parser("report", help="rebuild the HTML report")
    report.add_argument("--interactive", action="store_true", help="include runs from JupyterLab, nbval and store")
    report.set_defaults(func=cmd_report)
    zoo = sub.add_parser("zoo", help="model zoo")
    zoo.add_argument("action", choices=["prepare"])
    zoo.add_argument("names", nargs="*")
    zoo.set_defaults(func=cmd_zoo)
    stab = sub.add_parser("stability", help="run notebooks on 1 and 2 threads and compare every verdict")
    stab.add_argument("notebooks", nargs="*", help="notebook names (default: all)")
    stab.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts compared (default 1 2)")
    stab.add_argument("--timeout", type=float, default=1800.0, help="seconds per notebook run")
    stab.add_argument("--keep", default=None, help="keep the runs' outputs in this folder (default: a temporary one)")
    stab.set_defaults(func=cmd_stability)
    store = sub.add_parser("store", help="execute notebooks in place on their defaults (nbval's reference outputs)")
    store.add_argument("notebooks", nargs="+")
    store.set_defaults(func=cmd_store)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ParamsError, ValueError) as err:
        print(f"salience: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("salience: interrupted; previous results are untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

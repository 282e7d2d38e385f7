"""The `label` step: people rank the sampled responses in a web page; agreement and consensus from their labels.

    lightning-rlhf label --input samples.jsonl --output labels.jsonl [--labellers-per-item 3] [--port 8000]
    lightning-rlhf label --aggregate labels.jsonl --output comparisons.jsonl [--consensus borda] [--kto kto.jsonl]

Serving: open http://127.0.0.1:8000, enter a name, rank. Every label is appended to ``--output`` (a comparison
record with ``labeller``, ``item``, ``time`` and any ``flags`` / ``demonstration``) before it is acknowledged;
stop and start again with the same files to carry on. Aggregating: one comparison record per label (default), or
per item a consensus ranking; the agreement between labellers is printed and written beside the output. ``--kto``
also writes KTO's unpaired records, from the labellers' 1..7 ratings where an item has them, else from the rankings.
"""

from __future__ import annotations

import argparse
import json
import secrets
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lightning_rlhf.commands.label.agreement import CONSENSUS, agreement_report
from lightning_rlhf.commands.label.store import LabelStore, read_items, read_labels
from lightning_rlhf.data.records import unpaired_from_comparison
from lightning_rlhf.io import atomic_file, write_jsonl_atomic

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
AGGREGATE_ONLY = ("--demonstrations", "--kto", "--report", "--consensus")  # options of aggregating, none of serving
DESIRABLE, UNDESIRABLE = 5, 3  # a response's mean 1..7 rating at least / at most this is a KTO true / false


def aggregate(
    labels: list[dict[str, Any]], consensus: str | None = None, progress: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """``(comparisons, demonstrations, all_tied)`` from label records.

    Without ``consensus`` every label is kept as its own comparison record, items in order; with ``borda`` or
    ``bradley-terry`` each item gets one record ranked by ``CONSENSUS[consensus]`` over its labellers (with their
    names and every flag); an item whose consensus ties everything is left out and counted in ``all_tied``. Each
    written better answer becomes a ``{"prompt", "response"}`` demonstration. ``progress`` shows a bar (items done,
    items/s, time left) on stderr: a Bradley–Terry consensus takes milliseconds an item.
    """
    by_item: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for label in labels:
        by_item[label["item"]].append(label)
    comparisons, all_tied = [], 0
    for item in tqdm(sorted(by_item), desc="aggregating", unit="item", disable=not progress):
        group = sorted(by_item[item], key=lambda label: label["labeller"])
        if consensus is None:
            comparisons += group
            continue
        ranks = CONSENSUS[consensus]([label["ranks"] for label in group])
        if len(set(ranks)) < 2:
            all_tied += 1
            continue
        comparisons.append(
            {
                "prompt": group[0]["prompt"],
                "responses": group[0]["responses"],
                "ranks": ranks,
                "item": item,
                "labellers": [label["labeller"] for label in group],
                "flags": [
                    {**flag, "labeller": label["labeller"]} for label in group for flag in label.get("flags", [])
                ],
            }
        )
    demonstrations = [
        {"prompt": label["prompt"], "response": label["demonstration"], "labeller": label["labeller"], "item": item}
        for item in sorted(by_item)
        for label in by_item[item]
        if label.get("demonstration")
    ]
    return comparisons, demonstrations, all_tied


def unpaired(labels: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter]:
    """KTO's unpaired records ``{"prompt", "completion", "label"}`` and their ``Counter`` of ``ratings``,
    ``rankings`` (records made from each), ``neutral`` and ``unrated`` (responses left out).

    An item that any labeller rated: each response's mean rating over the labellers who rated it, ``DESIRABLE`` (5)
    or more desirable, ``UNDESIRABLE`` (3) or less undesirable, in between neutral; a response nobody rated is
    unrated. An item nobody rated: ``unpaired_from_comparison`` of each of its ``comparisons`` (the labels
    themselves, or the item's consensus: none for an item whose consensus ties everything).
    """
    by_item: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for label in labels:
        by_item[label["item"]].append(label)
    ranked: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for comparison in comparisons:
        ranked[comparison["item"]].append(comparison)
    records, counts = [], Counter()
    for item in sorted(by_item):
        group = by_item[item]
        rated = [label["ratings"] for label in group if any(r is not None for r in label.get("ratings") or [])]
        if not rated:
            from_ranks = [record for comparison in ranked[item] for record in unpaired_from_comparison(comparison)]
            records += from_ranks
            counts["rankings"] += len(from_ranks)
            continue
        for i, response in enumerate(group[0]["responses"]):
            given = [ratings[i] for ratings in rated if ratings[i] is not None]
            if not given:
                counts["unrated"] += 1
                continue
            mean = sum(given) / len(given)
            if UNDESIRABLE < mean < DESIRABLE:
                counts["neutral"] += 1
                continue
            records.append({"prompt": group[0]["prompt"], "completion": response, "label": mean >= DESIRABLE})
            counts["ratings"] += 1
    return records, counts


def format_report(report: dict[str, Any]) -> str:
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    def tau(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.3f}"

    lines = [
        f"{report['labels']} labels of {report['items']} items, {report['items_with_several_labellers']} with several "
        f"labellers: pairwise agreement {percent(report['pairwise_agreement'])}, "
        f"Kendall's tau {tau(report['kendall_tau'])}"
    ]
    for name, row in report["per_labeller"].items():
        lines.append(
            f"  {name}: {row['labels']} labels, agreement {percent(row['pairwise_agreement'])}, "
            f"tau {tau(row['kendall_tau'])}"
        )
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from lightning_rlhf.commands.label.app import make_app
    except ImportError as err:
        raise SystemExit(
            f"lightning-rlhf label needs the 'label' extra: pip install 'lightning_rlhf[label]' ({err})"
        ) from None
    token = args.token
    if args.host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(16)
    store = LabelStore(read_items(args.input), args.output, args.labellers_per_item)
    progress = store.progress("")
    where = f"http://{args.host}:{args.port}/" + (f"#token={token}" if token else "")
    print(f"{progress['done']} of {progress['total']} labels in {args.output}; labelling at {where}")
    try:
        uvicorn.run(make_app(store, token), host=args.host, port=args.port, log_level="warning")
    finally:
        store.close()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="lightning-rlhf label", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="records to rank: {'prompt', 'responses'} (as 'lightning-rlhf sample' writes)")
    source.add_argument("--aggregate", metavar="LABELS", help="a labels file to turn into comparisons + agreement")
    parser.add_argument("--output", required=True, help="labels file (serving) or comparisons file (--aggregate)")
    parser.add_argument("--host", default="127.0.0.1", help="any other host than loopback requires a token")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--labellers-per-item", type=int, default=1, help="serve each item until N have ranked it")
    parser.add_argument("--token", help="shared token for the API (made up and printed when another host is given)")
    parser.add_argument("--consensus", choices=sorted(CONSENSUS), help="with --aggregate: one ranking per item")
    parser.add_argument("--demonstrations", help="with --aggregate: write the better answers labellers wrote here")
    parser.add_argument("--kto", help="with --aggregate: write KTO's {prompt, completion, label} records here")
    parser.add_argument("--report", help="with --aggregate: agreement JSON (default: OUTPUT with .agreement.json)")
    args = parser.parse_args(argv)
    if args.labellers_per_item < 1:
        parser.error("--labellers-per-item must be at least 1")
    given = [flag for flag in AGGREGATE_ONLY if getattr(args, flag.removeprefix("--")) is not None]
    if args.input and given:  # refused, not ignored: whoever gave --kto FILE expects FILE
        parser.error(f"{given[0]} only means something with --aggregate: add --aggregate LABELS (or serve without it)")
    if args.input:
        serve(args)
        return None
    labels = read_labels(args.aggregate)
    report = agreement_report(labels)
    comparisons, demonstrations, all_tied = aggregate(labels, args.consensus, progress=True)
    write_jsonl_atomic(comparisons, args.output)
    if args.demonstrations:
        write_jsonl_atomic(demonstrations, args.demonstrations)
    report_path = Path(args.report or Path(args.output).with_suffix(".agreement.json"))
    with atomic_file(report_path) as out:
        json.dump(report, out, indent=2)
    print(format_report(report))
    print(
        f"{len(comparisons)} comparison records written to {args.output}"
        + (f", {all_tied} items left out because their consensus ties every response" if all_tied else "")
    )
    if args.kto:
        records, counts = unpaired(labels, comparisons)
        write_jsonl_atomic(records, args.kto)
        print(
            f"{len(records)} KTO records written to {args.kto} ({counts['ratings']} from ratings, "
            f"{counts['rankings']} from rankings); left out: {counts['neutral']} neutral (mean rating between 3 and "
            f"5) and {counts['unrated']} unrated responses of rated items"
        )
    return report

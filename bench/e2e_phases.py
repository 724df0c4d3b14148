"""The end-to-end bench's workload and phases (``bench/e2e.py``): the request bodies built before any clock starts
(``Workload``), each phase's attribution (server and client CPU, the server's own latency, encoder batches, other
processes' cores) and every HTTP figure against one running server (``measure_server``)."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.e2e_client import JSON_TYPE, Client, Outcomes, Request, classify, concurrent, search, sequential
from bench.e2e_server import Others, Server, metric_delta, scrape
from bench.measure import percentiles

LABEL_SET = "e2e-imagenette"


class Phase:
    """Attribution of one phase, from its start: server and client CPU, the server's latency and encoder batches."""

    def __init__(self, server: Server, client: Client) -> None:
        self.server, self.client = server, client
        self.scrape0 = scrape(client)
        self.wall0, self.server0, self.client0 = time.perf_counter(), server.cpu_s(), time.process_time()
        self.others = Others(lambda: server.cpu_s() + time.process_time())

    def summary(self, route: str, images: int) -> dict[str, Any]:
        wall, others = time.perf_counter() - self.wall0, self.others.cores()
        server_cpu, client_cpu = self.server.cpu_s() - self.server0, time.process_time() - self.client0
        after = scrape(self.client)
        lat_sum, lat_count = metric_delta(self.scrape0, after, "asif_request_seconds", f'route="{route}"')
        batch_sum, batch_count = metric_delta(self.scrape0, after, "asif_encoder_batch_size", 'encoder="image"')
        per = max(images, 1)
        return {
            "wall_s": wall,
            "server_cpu_ms_per_image": 1000 * server_cpu / per,
            "client_cpu_ms_per_image": 1000 * client_cpu / per,
            "server_cpu_cores": server_cpu / wall,
            "server_mean_ms": 1000 * lat_sum / lat_count if lat_count else None,
            "server_requests": lat_count,
            "encoder_mean_batch": batch_sum / batch_count if batch_count else None,
            "others_cores": others,
        }


@dataclass
class Workload:
    """Request bodies built before any clock starts."""

    stored: list[Request]
    inline: list[Request]
    batch32: list[Request]
    crowd: list[Request]
    searches: list[Request]
    put_label_set: Request


def workload(photos: list[bytes], labels: list[str], captions: list[str], args: argparse.Namespace) -> Workload:
    n1, nb = args.warmup + args.requests, args.batch_warmup + args.batch_requests
    stored_fields, inline_fields = {"label_set": LABEL_SET}, {"labels": json.dumps(labels)}
    cursor = itertools.count()

    def take(n: int) -> list[bytes]:
        return [photos[next(cursor) % len(photos)] for _ in range(n)]

    return Workload(
        stored=[classify([p], stored_fields) for p in take(n1)],
        inline=[classify([p], inline_fields) for p in take(n1 + 1)],
        batch32=[classify(take(32), stored_fields) for _ in range(nb)],
        crowd=[classify([p], stored_fields) for p in photos],
        searches=[search(c) for c in captions[:n1]],
        put_label_set=("PUT", f"/v1/label-sets/{LABEL_SET}", json.dumps({"labels": labels}).encode(), JSON_TYPE),
    )


def timed_phase(
    server: Server, client: Client, requests: Sequence[Request], warmup: int, route: str, per_request: int = 1
) -> dict[str, Any]:
    """Sequential requests: the first ``warmup`` untimed, then latency percentiles and the attribution."""
    sequential(client, requests[:warmup])
    phase = Phase(server, client)
    lat = sequential(client, requests[warmup:])
    return {"latency": percentiles(lat), **phase.summary(route, per_request * len(lat))}


def measure_server(server: Server, work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Every HTTP figure against one running server."""
    outcomes = Outcomes()
    client = Client(server.port, outcomes)
    start, end = client.timed(work.put_label_set)
    out: dict[str, Any] = {"label_set_put_ms": 1000 * (end - start)}
    out["classify_stored"] = timed_phase(server, client, work.stored, args.warmup, "/v1/classify")
    start, end = client.timed(work.inline[0])
    out["inline_first_ms"] = 1000 * (end - start)
    out["classify_inline"] = timed_phase(server, client, work.inline[1:], args.warmup, "/v1/classify")
    out["classify_32"] = timed_phase(server, client, work.batch32, args.batch_warmup, "/v1/classify", 32)
    out["classify_32"]["ms_per_image"] = out["classify_32"]["latency"]["p50_ms"] / 32
    phase = Phase(server, client)
    crowd = concurrent(server.port, outcomes, work.crowd, args.clients, args.crowd_warmup_s, args.crowd_seconds)
    out["concurrent"] = {**crowd, **phase.summary("/v1/classify", crowd["requests_total"])}
    out["search"] = timed_phase(server, client, work.searches, args.warmup, "/v1/search")
    client.send(("DELETE", f"/v1/label-sets/{LABEL_SET}", None, None))
    client.close()
    out["status_codes"] = {str(k): v for k, v in sorted(outcomes.codes.items())}
    out["errors"] = outcomes.errors
    return out

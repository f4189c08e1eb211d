"""OfferBrowser without a kernel or a browser: pure helpers, text/HTML snapshots, and real ipywidgets on
ipywidgets' own DummyComm, driven by a fake search that records its calls."""

from __future__ import annotations

import sys
from decimal import Decimal
from typing import Any

import pytest

from burst_jupyter.errors import RateLimited
from burst_jupyter.offer_book import SearchResult
from burst_jupyter.providers.base import Offer
from burst_jupyter.widgets import OfferBrowser, OfferFilter
from burst_jupyter.widgets.offer_controls import cell_html
from burst_jupyter.widgets.offer_table import offer_rows, sort_offers
from burst_jupyter.widgets.render import WIDGET_VIEW_MIMETYPE, no_math

SCRIPT = "<script>alert(1)</script>"


def offer(
    provider: str,
    offer_id: str,
    price: str,
    *,
    gpu: str | None = "RTX_4090",
    gpus: int = 1,
    memory: int | None = 24,
    reliability: float = 0.99,
    spot: bool = False,
    prototyping: bool = False,
    tier: str = "",
    location: str = "US",
    description: str = "",
) -> Offer:
    return Offer(
        provider=provider,
        offer_id=offer_id,
        gpu_model=gpu,
        gpus=gpus,
        price_usd_per_hour=Decimal(price),
        memory_gb=memory,
        reliability=reliability,
        spot=spot,
        prototyping=prototyping,
        tier=tier,
        location=location,
        description=description,
    )


# Cheapest whole-instance price is not the cheapest per GPU, and memory/reliability rank differently again.
CHEAP = offer("vast", "v-1", "0.35", reliability=0.90, location="Quebec, CA")
PAIR = offer("runpod", "RTX 4090", "0.70", gpus=2, memory=24, reliability=0.999, tier="secure")
QUAD = offer("vast", "v-4", "1.10", gpus=4, memory=24, reliability=0.95)
BIG = offer("thunder", "h100-1", "2.49", gpu="H100", memory=80, reliability=0.97)
SPOT = offer("vast", "v-9", "0.20", spot=True, reliability=0.80)
ALL = [CHEAP, PAIR, QUAD, BIG, SPOT]


class FakeSearch:
    """A search over ALL that applies the filter the way the offer book would, and records every call."""

    def __init__(self, offers: list[Offer] | None = None, errors: dict[str, str] | None = None) -> None:
        self.offers = ALL if offers is None else offers
        self.errors = errors or {}
        self.calls: list[tuple[OfferFilter, bool]] = []
        self.fail: Exception | None = None

    def __call__(self, flt: OfferFilter, refresh: bool) -> SearchResult:
        self.calls.append((flt, refresh))
        if self.fail is not None:
            raise self.fail
        query = flt.to_query()
        found = [o for o in self.offers if query.fits(o) and flt.provider in (None, o.provider)]
        asked = [p for p in ("vast", "runpod", "thunder") if flt.provider in (None, p)]
        errors = {p: e for p, e in self.errors.items() if p in asked}
        return SearchResult(
            offers=sorted(found, key=lambda o: o.price_usd_per_hour),
            errors=errors,
            seconds={p: 0.0 if not refresh else 0.1 for p in asked},
            elapsed=0.42,
        )


def browser(search: FakeSearch | None = None, *, initial: OfferFilter | None = None, **kw: Any) -> OfferBrowser:
    return OfferBrowser(
        search=search or FakeSearch(),
        initial=initial or OfferFilter(gpu="RTX_4090"),
        providers=["vast", "runpod", "thunder"],
        kernel_present=lambda: False,
        **kw,
    )


def find(view: OfferBrowser, description: str) -> Any:
    """The control or button a user sees with this label."""
    stack = [view.widget]
    while stack:
        w = stack.pop()
        if getattr(w, "description", None) == description:
            return w
        stack.extend(getattr(w, "children", ()))
    raise LookupError(description)


def html_parts(view: OfferBrowser) -> tuple[Any, Any, Any]:
    """(status, table, errors): the three HTML widgets between the control rows and the action row."""
    _, _, status, table, errors, _, _ = view.widget.children
    return status, table, errors


def cell_box(view: OfferBrowser) -> Any:
    """The HTML widget under the action row: the chosen offer's cell and its Copy button."""
    return view.widget.children[-1]


# --- pure helpers -----------------------------------------------------------------------------------------------


def test_rows_compute_per_gpu_price_in_decimal() -> None:
    quad, pair, big = offer_rows([QUAD, PAIR, BIG])
    assert (quad.price, quad.gpu_price) == ("$1.10", "$0.275")  # 1.10 / 4, as priced: not rounded to the cent
    assert QUAD.price_per_gpu_hour == Decimal("0.275")
    assert (pair.gpus, pair.gpu_price, pair.reliability, pair.offer_id) == ("2", "$0.35", "99.9%", "runpod:RTX_4090:x2")
    assert (big.gpu, big.memory, big.spot) == ("H100", "80", "")
    assert offer_rows([offer("vast", "x", "0.004", gpu=None, memory=None, spot=True)])[0].gpu_price == "$0.004"


@pytest.mark.parametrize(
    ("key", "order"),
    [
        ("price", [SPOT, CHEAP, PAIR, QUAD, BIG]),
        ("gpu_price", [SPOT, QUAD, CHEAP, PAIR, BIG]),  # 0.20, 0.275, 0.35, 0.35 (stable), 2.49
        ("memory", [BIG, SPOT, CHEAP, PAIR, QUAD]),  # 80 GB first, then the 24 GB ones in price order
        ("reliability", [PAIR, BIG, QUAD, CHEAP, SPOT]),
    ],
)
def test_sort_offers(key: str, order: list[Offer]) -> None:
    ranked = sorted(ALL, key=lambda o: o.price_usd_per_hour)
    assert sort_offers(ranked, key) == order


def test_sort_puts_unknown_memory_last_and_rejects_unknown_keys() -> None:
    unknown = offer("vast", "u", "0.10", memory=None)
    assert sort_offers([unknown, CHEAP, BIG], "memory") == [BIG, CHEAP, unknown]
    with pytest.raises(ValueError, match="unknown sort key"):
        sort_offers(ALL, "name")


def test_burst_options_for_a_filter_and_for_an_offer() -> None:
    assert OfferFilter().to_burst_options() == ""
    flt = OfferFilter(gpu="H100", gpus=2, max_price=Decimal("6.50"), provider="runpod", min_reliability=0.9, spot=True)
    assert flt.to_burst_options() == (
        "--provider runpod --gpu H100 --gpus 2 --max-price 6.50 --min-reliability 0.9 --spot"
    )
    # An offer is named by its --offer word (provider and count in it), at no more than its listed price, and
    # every filter that chose it stays: the minimum reliability too.
    assert flt.to_burst_options(QUAD) == "--offer vast:v-4:x4 --gpu RTX_4090 --max-price 1.10 --min-reliability 0.9"
    assert flt.to_burst_options(PAIR) == (
        "--offer runpod:RTX_4090:x2 --gpu RTX_4090 --max-price 0.70 --min-reliability 0.9"
    )
    assert OfferFilter().to_burst_options(SPOT) == "--offer vast:v-9 --gpu RTX_4090 --max-price 0.20 --spot"
    assert OfferFilter().to_burst_options(offer("vast", "c", "0.05", gpu=None)) == "--offer vast:c --max-price 0.05"
    # Nothing in the line for IPython to expand or the parser to split.
    odd = offer("my box", "x", "1", gpu="RTX_4090 ${secret}")
    assert OfferFilter().to_burst_options(odd) == "--offer 'my box:x' --gpu 'RTX_4090 secret' --max-price 1"


def test_a_prototyping_offer_is_shown_only_when_allowed_and_its_cell_allows_it() -> None:
    proto = offer("thunder", "a100xl_x1_prototyping", "0.78", gpu="A100_80GB", memory=80, reliability=0.9,
                  prototyping=True, tier="prototyping", description="1 x A100 (prototyping, ...; may be interrupted)")
    search = FakeSearch([*ALL, proto])
    view = browser(search, initial=OfferFilter(gpu="A100_80GB"))
    assert view.offers == []  # not allowed: not shown
    allowed = OfferFilter(gpu="A100_80GB", prototyping=True)
    view.update_filter(allowed)
    assert view.offers == [proto] and "prototyping" in view.snapshot_text().splitlines()[2]
    # Its limits are said under the table, text and HTML alike, not only in a hover.
    limits = "thunder:a100xl_x1_prototyping: 1 x A100 (prototyping, ...; may be interrupted)"
    assert view.snapshot_text().splitlines()[3] == f"  {limits}" and limits in view.snapshot_html()
    assert allowed.to_burst_options() == "--gpu A100_80GB --prototyping"
    assert allowed.to_burst_options(proto) == (
        "--offer thunder:a100xl_x1_prototyping --gpu A100_80GB --max-price 0.78 --prototyping")
    assert "prototyping allowed" in allowed.describe()


# --- text and HTML snapshots ------------------------------------------------------------------------------------


def test_text_lists_offers_cheapest_first() -> None:
    search = FakeSearch()
    view = browser(search)
    assert search.calls == [(OfferFilter(gpu="RTX_4090"), False)]  # the constructor searched once, cached
    lines = repr(view).splitlines()
    assert lines[0] == "3 offers from 2 of 3 providers in 0.42 s (cached) · RTX_4090 ×1 · all providers"
    assert lines[1].split() == [
        "provider",
        "GPU",
        "count",
        "$/h",
        "$/GPU-h",
        "GPU",
        "GB",
        "reliability",
        "spot",
        "tier",
        "location",
        "--offer",
    ]
    # The last column is what --offer takes, in one word: a RunPod GPU type's spaces become "_".
    assert lines[2].split() == ["vast", "RTX_4090", "1", "$0.35", "$0.35", "24", "90.0%", "Quebec,", "CA", "vast:v-1"]
    assert lines[3].split() == [
        "runpod", "RTX_4090", "2", "$0.70", "$0.35", "24", "99.9%", "secure", "US", "runpod:RTX_4090:x2"
    ]
    assert lines[4].split() == ["vast", "RTX_4090", "4", "$1.10", "$0.275", "24", "95.0%", "US", "vast:v-4:x4"]
    assert len(lines) == 5
    # Fixed width, numbers right-aligned: the $/h column ends at the same place in every line.
    assert lines[1].index("$/h") + 3 == lines[2].index("$0.35") + 5 == lines[3].index("$0.70") + 5
    assert view._repr_mimebundle_()["text/plain"] == repr(view)


def test_pretty_and_html_reprs_agree_with_the_snapshots() -> None:
    view = browser()
    printed: list[str] = []
    view._repr_pretty_(type("P", (), {"text": lambda self, t: printed.append(t)})(), False)
    assert printed == [view.snapshot_text()]
    assert view._repr_html_() == view._repr_mimebundle_()["text/html"] == no_math(view.snapshot_html())
    assert set(view._repr_mimebundle_()) == {"text/html", "text/plain"}  # no kernel: no widget view


def test_provider_errors_are_listed_under_the_table() -> None:
    view = browser(FakeSearch(errors={"thunder": "rate limited (429), retry in a minute", "vast": "bad key\x1b[31m"}))
    text = view.snapshot_text()
    assert text.endswith("errors:\n  thunder: rate limited (429), retry in a minute\n  vast: bad key")
    html = view.snapshot_html()
    assert html.index("</table>") < html.index("thunder: rate limited (429)")
    assert "\x1b" not in text + html


def test_empty_result_says_no_offers_fit() -> None:
    view = browser(initial=OfferFilter(gpu="A100_80GB", max_price=Decimal("0.50")))
    assert view.snapshot_text() == (
        "0 offers from 0 of 3 providers in 0.42 s (cached) · A100_80GB ×1 · ≤ $0.50/h · all providers\nno offers fit"
    )
    assert "no offers fit" in view.snapshot_html() and "<table" not in view.snapshot_html()


def test_hostile_remote_text_is_escaped_and_cleaned() -> None:
    evil = offer(
        "vast",
        "<img src=x onerror=alert(1)>",
        "0.30",
        description=SCRIPT + "\x1b]0;pwned\x07",
        location="<b>x</b>\nline two",
    )
    view = browser(FakeSearch([evil], errors={"vast": SCRIPT}))
    html = view.snapshot_html()
    assert "<script" not in html and "<img" not in html and "<b>x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "vast:&lt;img_src=x_onerror=alert(1)&gt;" in html  # the --offer word: whitespace made "_"
    view.select(evil)
    with_cell = cell_html(view.cell_text())
    assert "<img" not in with_cell and "<b>x" not in with_cell and "\x1b" not in with_cell
    assert "--offer &#x27;vast:&lt;img_src=x_onerror=alert(1)&gt;&#x27;" in with_cell  # quoted: one word still
    assert "\x1b" not in html and "\x07" not in html
    row = offer_rows([evil])[0]
    assert row.location == "<b>x</b> line two"  # one line: a table cell (or a cell comment) stays one line


def test_only_max_rows_are_shown() -> None:
    many = [offer("vast", f"v{i}", f"{1 + i / 100:.2f}") for i in range(8)]
    view = browser(FakeSearch(many), max_rows=3)
    assert [o.offer_id for o in view.offers] == ["v0", "v1", "v2"]
    assert view.snapshot_text().splitlines()[-1] == "… and 5 more; narrow the filter to see them"
    assert "and 5 more" in view.snapshot_html()


def test_a_given_result_is_shown_without_searching() -> None:
    search = FakeSearch()
    view = browser(search, result=SearchResult(offers=[BIG], elapsed=1.5, seconds={"thunder": 1.5}))
    assert search.calls == []
    assert view.offers == [BIG]
    assert view.snapshot_text().startswith("1 offer from 1 provider in 1.50 s · ")


def test_actions_without_widgets() -> None:
    inserted: list[str] = []
    launched: list[Offer] = []
    view = browser(on_insert=inserted.append, on_launch=launched.append)
    view.launch()  # nothing chosen: nothing launched
    assert launched == []
    view.insert()
    assert inserted == [
        "%%burst --gpu RTX_4090\n# the cheapest offer that fits when the cell runs (RTX_4090 ×1 · all providers)\n"
    ]
    view.select(PAIR)
    view.launch()
    assert launched == [PAIR]
    assert "launching RTX_4090 ×2 on runpod at $0.70/h" in view.snapshot_text()


def test_a_failing_search_in_the_constructor_shows_instead_of_raising() -> None:
    search = FakeSearch()
    search.fail = RateLimited("vast: too many requests")
    view = browser(search)
    assert view.error == "vast: too many requests"
    assert view.snapshot_text().splitlines()[:3] == [
        "0 offers from 0 providers in 0.00 s · RTX_4090 ×1 · all providers",
        "search failed: vast: too many requests",
        "no offers fit",
    ]


# --- the live widget --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("dummy_comm")
def test_mimebundle_has_the_widget_view_with_a_kernel() -> None:
    view = OfferBrowser(search=FakeSearch(), initial=OfferFilter(), providers=["vast"], kernel_present=lambda: True)
    bundle = view._repr_mimebundle_()
    assert set(bundle) == {WIDGET_VIEW_MIMETYPE, "text/html", "text/plain"}
    assert bundle[WIDGET_VIEW_MIMETYPE]["model_id"] == view.widget.model_id
    assert find(view, "provider").options == ("all", "vast")


@pytest.mark.usefixtures("dummy_comm")
def test_filter_changes_search_the_cache_and_update_the_table() -> None:
    search = FakeSearch()
    view = browser(search)
    status, table, _ = html_parts(view)
    assert table.value.count("<tr") == 4  # header and three 4090 offers

    find(view, "GPU").value = "h100"
    assert search.calls[-1] == (OfferFilter(gpu="H100"), False)
    assert table.value.count("<tr") == 2 and "h100-1" in table.value and "v-1" not in table.value
    assert '<span style="color:inherit">1 offer from 1 of 3 providers' in status.value

    find(view, "GPU").value = "RTX_4090"
    find(view, "spot").value = True
    assert search.calls[-1] == (OfferFilter(gpu="RTX_4090", spot=True), False)
    assert "v-9" in table.value and "v-1" not in table.value

    find(view, "spot").value = False
    find(view, "GPUs").value = 2
    find(view, "max $/h").value = "$1"
    find(view, "provider").value = "vast"
    find(view, "min reliability").value = 0.5
    assert search.calls[-1] == (
        OfferFilter(gpu="RTX_4090", gpus=2, max_price=Decimal("1"), provider="vast", min_reliability=0.5),
        False,
    )
    assert "<i>no offers fit</i>" in table.value and "<table" not in table.value  # QUAD costs $1.10
    assert all(refresh is False for _, refresh in search.calls)
    assert view.filter == search.calls[-1][0]


@pytest.mark.usefixtures("dummy_comm")
def test_a_bad_price_is_reported_and_not_searched() -> None:
    search = FakeSearch()
    view = browser(search)
    calls = len(search.calls)
    find(view, "max $/h").value = "cheap"
    assert len(search.calls) == calls
    status, _, _ = html_parts(view)
    assert "not searched: max $/h: &#x27;cheap&#x27; is not a number" in status.value


@pytest.mark.usefixtures("dummy_comm")
def test_refresh_bypasses_the_cache() -> None:
    search = FakeSearch()
    view = browser(search)
    find(view, "Refresh").click()
    assert search.calls[-1] == (OfferFilter(gpu="RTX_4090"), True)
    assert "(cached)" not in html_parts(view)[0].value


@pytest.mark.usefixtures("dummy_comm")
def test_sorting_reorders_the_table_without_searching() -> None:
    search = FakeSearch()
    view = browser(search)
    _, table, _ = html_parts(view)
    find(view, "sort by").value = "gpu_price"
    assert len(search.calls) == 1
    assert view.sort_key == "gpu_price"
    assert table.value.index("v-4") < table.value.index("v-1")
    find(view, "sort by").value = "reliability"
    assert [o.offer_id for o in view.offers] == ["RTX 4090", "v-4", "v-1"]


@pytest.mark.usefixtures("dummy_comm")
def test_the_cell_copy_and_launch_use_the_chosen_offer() -> None:
    inserted: list[str] = []
    launched: list[Offer] = []
    view = browser(on_insert=inserted.append, on_launch=launched.append)
    choice, launch, cell = find(view, "offer"), find(view, "Launch"), cell_box(view)
    assert choice.value == -1 and launch.disabled  # nothing chosen yet: the filter's cell
    assert "%%burst --gpu RTX_4090\n# the cheapest offer that fits" in cell.value

    choice.value = 1  # the second row: runpod's pair
    assert view.selected == PAIR and not launch.disabled
    assert 'style="background:#e3f2fd"' in html_parts(view)[1].value
    # The cell is shown in full with a Copy button the browser runs alone; no widget claims to add a cell.
    text = view.cell_text()
    assert text == (
        "%%burst --offer runpod:RTX_4090:x2 --gpu RTX_4090 --max-price 0.70\n"
        "# RTX_4090 ×2 on runpod, $0.70/h when listed (offer runpod:RTX_4090:x2, US)\n"
    )
    assert 'rows="3" spellcheck="false"' in cell.value and f">{text}</textarea>" in cell.value
    assert "Copy %%burst cell</button>" in cell.value and "navigator.clipboard.writeText" in cell.value
    assert "a click in a widget cannot add a cell" in cell.value
    assert all(getattr(w, "description", "") != "Insert %%burst cell" for w in view.widget.children[-2].children)
    view.insert()  # from code in a cell: the front end adds it below that cell
    assert inserted == [text]
    assert "inserted a %%burst cell below the cell that ran insert()" in html_parts(view)[0].value
    launch.click()
    assert launched == [PAIR]

    # The choice survives a re-sort and a re-search that still has it, and clears when it is gone.
    find(view, "sort by").value = "reliability"
    assert view.selected == PAIR and choice.value == 0
    find(view, "Refresh").click()
    assert view.selected == PAIR
    find(view, "GPU").value = "H100"
    assert view.selected is None and choice.value == -1 and launch.disabled
    assert "--offer" not in cell.value and "%%burst --gpu H100" in cell.value


@pytest.mark.usefixtures("dummy_comm")
def test_launch_is_not_shown_without_a_callback() -> None:
    view = browser()
    find(view, "offer").value = 0
    launch = find(view, "Launch")
    assert launch.layout.display == "none" and launch.disabled
    launch.click()  # a no-op, not an error
    assert find(browser(on_launch=print), "Launch").layout.display is None


@pytest.mark.usefixtures("dummy_comm")
def test_prices_are_kept_from_mathjax() -> None:
    view = browser()
    for part in (*html_parts(view)[:2], cell_box(view)):
        assert part.value.startswith(no_math("")[:-6]), part.value
    assert view._repr_mimebundle_()["text/html"] == no_math(view.snapshot_html())


@pytest.mark.usefixtures("dummy_comm")
def test_a_failing_search_shows_the_error_and_keeps_the_last_offers() -> None:
    search = FakeSearch()
    view = browser(search)
    search.fail = RuntimeError("event loop is closed")
    find(view, "Refresh").click()  # must not raise out of the click handler
    status, table, _ = html_parts(view)
    assert "search failed: RuntimeError: event loop is closed" in status.value
    assert "color:#c62828" in status.value
    assert "v-1" in table.value
    assert not find(view, "Refresh").disabled
    search.fail = None
    find(view, "Refresh").click()
    assert view.error is None and "search failed" not in html_parts(view)[0].value


@pytest.mark.usefixtures("dummy_comm")
def test_a_failing_callback_shows_the_error() -> None:
    def broken(_offer: Offer) -> None:
        raise RateLimited("runpod: rate limited")

    view = browser(on_launch=broken)
    find(view, "offer").value = 0
    find(view, "Launch").click()
    assert "launch failed: runpod: rate limited" in html_parts(view)[0].value


@pytest.mark.usefixtures("dummy_comm")
def test_update_filter_from_code_moves_the_controls_and_searches_once() -> None:
    search = FakeSearch()
    view = browser(search)
    _ = view.widget
    view.update_filter(OfferFilter(gpu="H100", gpus=1, max_price=Decimal("3"), provider="thunder"))
    assert len(search.calls) == 2  # the constructor's, and this one: writing the controls does not search
    assert (find(view, "GPU").value, find(view, "max $/h").value, find(view, "provider").value) == (
        "H100",
        "3",
        "thunder",
    )


@pytest.mark.usefixtures("dummy_comm")
def test_close_closes_every_widget() -> None:
    view = browser()
    stack, widgets = [view.widget], []
    while stack:
        w = stack.pop()
        widgets.append(w)
        stack.extend(getattr(w, "children", ()))
    view.close()
    assert all(w.comm is None for w in widgets)


def test_without_ipywidgets_the_browser_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` fail
    view = OfferBrowser(search=FakeSearch(), initial=OfferFilter(), providers=["vast"], kernel_present=lambda: True)
    assert set(view._repr_mimebundle_()) == {"text/html", "text/plain"}
    with pytest.raises(ImportError):
        _ = view.widget

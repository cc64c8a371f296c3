"""Probe pane: type text, the model and SAE run in a worker; per token the top features and
for the whole text the features ranked by max activation; Enter opens a feature."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from saetui.tui.bindings import bindings
from saetui.tui.messages import OpenFeature
from saetui.tui.render import feature_ref, show_token
from saetui.tui.widgets.tokens import TokenStrip

RANKED_SHOWN = 200


class ProbePane(Vertical):
    BINDINGS = bindings("probe")
    DEFAULT_CSS = """
    ProbePane #probe-input { border: none; height: 1; padding: 0 1; background: $boost; }
    ProbePane #probe-input:focus { background: $accent 30%; }
    ProbePane #probe-status { height: 1; padding: 0 1; color: $text-muted; }
    ProbePane #probe-lists { height: 1fr; }
    ProbePane #probe-steer { height: auto; max-height: 8; padding: 0 1; }
    ProbePane OptionList { width: 1fr; height: 1fr; border: round $panel; }
    ProbePane OptionList:focus { border: round $accent; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.result: Any = None  # saetui.analysis.probe.ProbeResult
        self.focus_feature: int | None = None  # shade the text by this feature
        self.steering: Any = None  # the last saetui.analysis.causal.SteeringResult
        self._names: dict[int, Any] = {}  # feature -> ActiveFeature (label, top tokens)
        self._token_features: list[int] = []
        self._ranked: list[int] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="type text and press Enter to probe", id="probe-input")
        yield Static("the model loads on the first probe", id="probe-status")
        yield Static("", id="probe-steer")
        yield TokenStrip(id="probe-tokens")
        with Horizontal(id="probe-lists"):
            yield OptionList(id="probe-at-token")
            yield OptionList(id="probe-ranked")

    def on_mount(self) -> None:
        self.query_one("#probe-at-token", OptionList).border_title = "at token"
        self.query_one("#probe-ranked", OptionList).border_title = "ranked by max"

    def status(self, text: str | Text) -> None:
        self.query_one("#probe-status", Static).update(text)

    # ------------------------------------------------------------------ running

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value
        if not text.strip():
            self.status(Text("type some text first", style="yellow"))
            return
        self.status(Text("running… (loading the model the first time)", style="italic"))
        self.run_probe(text, self.focus_feature)

    def shade_by(self, feature: int | None) -> None:
        """Shade the text by ``feature`` (None: by each token's strongest feature) and run
        the probe again on the same text when there is one."""
        self.focus_feature = feature
        text = self.result.text if self.result is not None else self.query_one(Input).value
        if text.strip():
            self.status(Text("running…", style="italic"))
            self.run_probe(text, feature)
        elif feature is not None:
            self.status(f"type text and press Enter: it will be shaded by #{feature}")

    @work(thread=True, exclusive=True, exit_on_error=False, group="probe")
    def run_probe(self, text: str, focus: int | None = None) -> None:
        app: Any = self.app

        def status(message: str) -> None:
            if not get_current_worker().is_cancelled:
                app.call_from_thread(self.status, Text(message, style="italic"))

        try:
            result = app.probe_service().probe(text, status=status, focus=focus)
            shown = {e.feature for e in result.ranked[:RANKED_SHOWN]}
            shown |= {f for top in result.per_token for f, _ in top}
            if focus is not None:
                shown.add(focus)
            names = {entry.feature: entry for entry in app.source.named((f, 0.0) for f in shown)}
        except Exception as error:  # a model that cannot load is a message, not a crash
            if get_current_worker().is_cancelled:
                return  # the app is quitting (it killed the model process)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            app.call_from_thread(self.status, Text(f"probe failed: {message}", style="red"))
            return
        if not get_current_worker().is_cancelled:
            app.call_from_thread(self.show_result, result, names)

    def _ref(self, feature: int, score: float, bold: bool = False) -> Text:
        entry = self._names.get(feature)
        label, tokens = (entry.label, entry.top_tokens) if entry is not None else ("", "")
        return feature_ref(feature, label, tokens, score, bold=bold)

    def show_result(self, result: Any, names: dict[int, Any] | None = None) -> None:
        self.result = result
        self._names = names or {}
        self._ranked = [entry.feature for entry in result.ranked[:RANKED_SHOWN]]
        ranked = self.query_one("#probe-ranked", OptionList)
        ranked.set_options(
            [
                Option(
                    _fit(
                        Text.assemble(
                            (
                                (
                                    f"@{show_token(result.tokens[entry.position])!r}"
                                    f" ×{entry.n_tokens} "
                                ),
                                "dim",
                            ),
                            self._ref(
                                entry.feature, entry.max_value, entry.feature == result.focus
                            ),
                        ),
                        ranked,
                    )
                )
                for entry in result.ranked[:RANKED_SHOWN]
            ]
            or [Option(Text("no feature fired", style="dim"), disabled=True)]
        )
        if self._ranked:
            ranked.highlighted = 0
        n = len(result.tokens)
        truncated = " (truncated)" if result.truncated else ""
        if result.focus is not None:
            top = max(result.focus_values, default=0.0)
            shading = Text.assemble(
                "shaded by ", self._ref(result.focus, top, True), " (a: by each token's top)"
            )
        else:
            shading = Text("s on a listed feature shades the text by it")
        self.status(
            Text.assemble(
                f"{n} tokens{truncated}, {len(result.ranked)} fired · ", shading, style="dim"
            )
        )
        strip = self.query_one(TokenStrip)
        if result.focus is not None:
            values = list(result.focus_values)
        else:
            values = [top[0][1] if top else 0.0 for top in result.per_token]
        strip.set_tokens(result.tokens, values, cursor=0)
        strip.focus()

    def on_token_strip_cursor_moved(self, message: TokenStrip.CursorMoved) -> None:
        if self.result is None or not self.result.per_token:
            return
        position = min(message.position, len(self.result.per_token) - 1)
        top = self.result.per_token[position]
        self._token_features = [f for f, _ in top]
        at_token = self.query_one("#probe-at-token", OptionList)
        at_token.border_title = f"at {show_token(self.result.tokens[position])!r}"
        rows = [Option(_fit(self._ref(f, v, f == self.result.focus), at_token)) for f, v in top]
        if self.result.focus is not None and self.result.focus not in self._token_features:
            value = self.result.focus_values[position]
            rows.append(Option(_fit(self._ref(self.result.focus, value, True), at_token)))
            self._token_features.append(self.result.focus)
        at_token.set_options(
            rows or [Option(Text("no feature fires here", style="dim"), disabled=True)]
        )
        if top:
            at_token.highlighted = 0

    # ------------------------------------------------------------------ actions

    def _focused_list(self) -> OptionList:
        focused = self.screen.focused
        if isinstance(focused, OptionList) and focused.id in ("probe-at-token", "probe-ranked"):
            return focused
        return self.query_one("#probe-at-token", OptionList)

    def action_focus_input(self) -> None:
        text_box = self.query_one(Input)
        text_box.focus()
        text_box.select_all()

    def action_move(self, delta: int) -> None:
        self.query_one(TokenStrip).move(delta)

    def action_list_down(self) -> None:
        self._focused_list().action_cursor_down()

    def action_list_up(self) -> None:
        self._focused_list().action_cursor_up()

    def action_switch_list(self) -> None:
        current = self._focused_list()
        other = "#probe-ranked" if current.id == "probe-at-token" else "#probe-at-token"
        self.query_one(other, OptionList).focus()

    def action_open(self) -> None:
        options = self._focused_list()
        features = self._ranked if options.id == "probe-ranked" else self._token_features
        index = options.highlighted
        if index is not None and index < len(features):
            self.post_message(OpenFeature(features[index]))

    def action_steer(self) -> None:
        """Ask for features and strengths, then generate steered and unsteered text."""
        from saetui.tui.screens.path import PathScreen

        text = self.result.text if self.result is not None else self.query_one(Input).value
        if not text.strip():
            self.status(Text("type a prompt first (i), then g steers a generation", "yellow"))
            return
        feature = self._highlighted_feature() or self.focus_feature
        default = f"#{feature} x8 mode=all tokens=20" if feature is not None else "#0 x8"

        def chosen(spec: str | None) -> None:
            if spec:
                self.run_steer(text, spec)

        self.app.push_screen(
            PathScreen("Steer: #id xstrength … mode=all|prompt|frozen tokens=N [clamp]", default),
            chosen,
        )

    @work(thread=True, exclusive=True, exit_on_error=False, group="steer")
    def run_steer(self, prompt: str, spec: str) -> None:
        from saetui.analysis.causal import parse_steering

        app: Any = self.app
        try:
            features, options = parse_steering(spec)
            app.call_from_thread(self.status, Text(f"steering {spec}…", style="italic"))
            result = app.probe_service().steer(prompt, features, **options)
        except Exception as error:
            if not get_current_worker().is_cancelled:
                app.call_from_thread(self.status, Text(f"steering failed: {error}", "red"))
            return
        if not get_current_worker().is_cancelled:
            app.call_from_thread(self.show_steering, result)

    def show_steering(self, result: Any) -> None:
        self.steering = result
        names = ", ".join(
            f"#{f} {'=' if result.clamp else 'x'}{s:g}" for f, s in result.features.items()
        )
        self.query_one("#probe-steer", Static).update(
            Text.assemble(
                (f"steered ({names}, {result.mode}): ", "bold green"),
                show_token(result.steered_text),
                "\n",
                ("unsteered: ", "bold"),
                show_token(result.unsteered_text),
            )
        )
        self.status(Text("g steers again · the lists still show the probe", style="dim"))

    def _highlighted_feature(self) -> int | None:
        options = self._focused_list()
        features = self._ranked if options.id == "probe-ranked" else self._token_features
        index = options.highlighted
        return features[index] if index is not None and index < len(features) else None

    def action_shade(self) -> None:
        feature = self._highlighted_feature()
        if feature is not None:
            self.shade_by(feature)

    def action_shade_all(self) -> None:
        self.shade_by(None)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        event.option_list.focus()
        self.action_open()


def _fit(text: Text, options: OptionList) -> Text:
    """One line per option: an OptionList wraps long prompts, so cut them to its width."""
    width = options.scrollable_content_region.width or options.size.width or 40
    fitted = text.copy()
    fitted.truncate(max(8, width - 1), overflow="ellipsis")
    return fitted

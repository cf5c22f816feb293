"""Click plumbing for `lytools merge`: `--ratios R...` takes every following number (negative ones too)."""

from __future__ import annotations

import click


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class GreedyNumbersOption(click.Option):
    """An option that takes one value, then keeps taking the following arguments while they are numbers.

    `--ratios 0.5 -0.3 a.safetensors` gives ("0.5", "-0.3"); repeating the option or writing
    `--ratios 0.5,-0.3` works too.
    """

    def add_to_parser(self, parser, ctx):
        result = super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            original = option.process

            def process(value, state, original=original):
                original(value, state)
                while state.rargs and _is_number(state.rargs[0]):
                    original(state.rargs.pop(0), state)

            option.process = process
        return result


def ratios_option(func):
    return click.option(
        "--ratios", "ratios", cls=GreedyNumbersOption, multiple=True, metavar="R...",
        help="One ratio per network input, in order (default 1.0 each; negative subtracts).",
    )(func)

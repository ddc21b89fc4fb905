"""The frame of the commands whose flags live in a private absl registry.

emola-prepare, emola-infer and emola-eval define their flags in their own `flags.FlagValues`
when they run, so importing them (e.g. several in one test session, each with a --task or an
--output) defines nothing in absl's global registry and no DuplicateFlagError can arise. This
module parses such a registry (with --help), checks the required flags and turns the errors a
command expects into a message and exit status 1.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def parse_flags(fv: flags.FlagValues, argv: Sequence[str], prog: str, doc: str) -> list[str]:
  """Parses `argv` into the private FlagValues `fv` (absl's own flags go to the global registry);
  prints help for --help. Exits with a message naming the flag on a flag error."""
  if any(a in HELP_ARGS for a in argv[1:]):
    print(f"{doc}\nflags:\n{fv.get_help()}")
    sys.exit(0)
  try:
    rest = fv(list(argv), known_only=True)
    if len(rest) == 1:
      # Nothing left for the global registry: mark it parsed without running validators of flags
      # other modules may have put there.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      return rest
    return flags.FLAGS(rest)
  except flags.Error as e:
    print(f"{prog}: flag error: {e}\nPass --help to see the flags.", file=sys.stderr)
    sys.exit(1)


@dataclasses.dataclass(frozen=True)
class Command:
  """A command: `action(fv) -> exit status` run on flags from `define_flags(FlagValues())`.

  `required` flags must be set (else exit 1 naming them); exceptions of the `errors` types are
  printed as `<prog>: error: ...` with exit status 1; `quiet_logs` lowers absl logging to
  WARNING unless --verbosity is given (Orbax logs every restore at INFO).
  """
  prog: str
  doc: str
  define_flags: Callable[[flags.FlagValues], flags.FlagValues]
  action: Callable[[flags.FlagValues], int]
  required: tuple[str, ...] = ()
  errors: tuple[type[Exception], ...] = ()
  quiet_logs: bool = False

  def main(self, argv: Sequence[str], fv: flags.FlagValues) -> int:
    """Runs the command on the parsed flags `fv`; returns the exit status."""
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {list(argv[1:])}; pass everything as --flags")
    missing = [name for name in self.required if fv[name].value in (None, "", [])]
    if missing:
      print(f"{self.prog}: error: --{', --'.join(missing)} required; pass --help to see the "
            "flags", file=sys.stderr)
      return 1
    if self.quiet_logs and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return self.action(fv)
    except self.errors as e:
      print(f"{self.prog}: error: {e}", file=sys.stderr)
      return 1

  def cli(self, args: Sequence[str]) -> int:
    """Runs the command on `args` (without the program name) in this process; returns the exit
    status."""
    fv = self.define_flags(flags.FlagValues())
    return self.main(parse_flags(fv, [self.prog, *args], self.prog, self.doc), fv)

  def run(self) -> None:
    """The console-script entry point."""
    fv = self.define_flags(flags.FlagValues())
    app.run(lambda argv: sys.exit(self.main(argv, fv)),
            flags_parser=lambda argv: parse_flags(fv, argv, self.prog, self.doc))

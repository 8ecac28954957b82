#!/usr/bin/env bash
# Shared helpers of the launch scripts: every command is printed before it runs, and
# DRY_RUN=1 prints without running anything.

# Prints a command (shell-quoted) and runs it unless DRY_RUN=1.
run() {
  local a line="+"
  for a in "$@"; do
    if [[ "${a}" =~ [[:space:]\"\$\'\;\&\|] ]]; then line+=" '${a//\'/\'\\\'\'}'"; else line+=" ${a}"; fi
  done
  echo "${line}"
  if [[ "${DRY_RUN:-0}" != "1" ]]; then
    "$@"
  fi
}

# Fails with a one-line message unless the named variables are set.
require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      echo "error: set ${name} (see launch/README.md)" >&2
      exit 1
    fi
  done
}

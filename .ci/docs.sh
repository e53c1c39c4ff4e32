#!/usr/bin/env bash
# Builds the documentation (docs/) with warnings as errors: the HTML pages, then every doctest in
# them. Run inside an activated virtual environment that holds cpsl_ops and the "examples" extra
# (the API pages document the installed package; the trainer page's doctest imports the trainer):
#   bash .ci/docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."

pip install --quiet -r docs/requirements.txt

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Checked outside the checkout, whose cpsl_ops/ (without a built extension in CI) would shadow the
# installed package; sphinx-build does not put the working directory on sys.path.
(cd "$out" && python -c 'import cpsl_ops, torchvision') || {
  echo "docs: cpsl_ops and the examples extra (torchvision) must be installed in this environment" >&2
  exit 1
}
sphinx-build -W --keep-going -q -b html docs "$out/html"
sphinx-build -W --keep-going -q -b doctest docs "$out/doctest"
sed -n '/^Doctest summary/,$p' "$out/doctest/output.txt"
echo "docs: HTML and doctests built without a warning"

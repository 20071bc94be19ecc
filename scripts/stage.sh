# Sourced by scripts/test and .ci/run: `stage NAME COMMAND…` runs the command and prints its wall
# time.
stage() {
  local name=$1
  shift
  local start=$SECONDS
  echo "::: ${name}"
  "$@"
  echo "::: ${name} took $((SECONDS - start)) s"
}

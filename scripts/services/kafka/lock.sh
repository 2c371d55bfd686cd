#!/usr/bin/env bash
# Regenerates scripts/services/kafka/jars.sha256, the lock file that scripts/services.sh checks the cached Kafka jars
# against, after a change to pom.xml (a new Kafka release, say). Fetches into a scratch directory with Maven's
# strict checksums, never from the cache, so a tampered cache cannot end up in the lock file. Review the diff.
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
[ -n "$version" ] || { echo "lock.sh: no <kafka.version> in $here/pom.xml" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mvn -B -q -C -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$scratch/jars" >"$scratch/mvn.log" 2>&1 \
  || { tail -n 30 "$scratch/mvn.log" >&2; echo "lock.sh: Maven could not fetch the jars" >&2; exit 1; }
{
  echo "# sha256 of every jar the test Kafka broker runs, as fetched by Maven from pom.xml."
  echo "# scripts/services.sh refuses to start Kafka when the cached jars differ. Regenerate: scripts/services/kafka/lock.sh"
  echo "# kafka.version=$version"
  (cd "$scratch/jars" && sha256sum -- *.jar | LC_ALL=C sort -k2)
} >"$here/jars.sha256.tmp"
mv "$here/jars.sha256.tmp" "$here/jars.sha256"
echo "lock.sh: wrote $here/jars.sha256 ($(grep -vc '^#' "$here/jars.sha256") jars, Kafka $version)"

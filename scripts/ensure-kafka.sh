#!/usr/bin/env bash
# Apache Kafka for the tests and bench.kafka, as Maven artifacts (no tarball, no Docker): the
# broker jar, its tools and every dependency copied into one cached directory, which the test
# harness puts on the JVM's classpath (tests/harness/services.py: KafkaServer). The first run
# downloads about 55 MB from Maven Central (under a minute here); later runs only check the
# stamp. Prints the directory. MARKETFLOW_CACHE moves the cache (default ~/.cache/marketflow).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/kafka/pom.xml"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
cache="${MARKETFLOW_CACHE:-$HOME/.cache/marketflow}"
libs="$cache/kafka-$version/libs"
stamp="$libs/.complete"
if [ -f "$stamp" ] && cmp -s "$pom" "$stamp"; then
  echo "$libs"
  exit 0
fi
command -v java >/dev/null || { echo "ensure-kafka: java (JDK 17+) is not installed" >&2; exit 1; }
command -v mvn >/dev/null || { echo "ensure-kafka: mvn (Maven) is not installed" >&2; exit 1; }
echo "ensure-kafka: fetching Apache Kafka $version jars from Maven Central into $libs" >&2
tmp="$libs.tmp.$$"
rm -rf "$tmp"
mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$tmp" >&2
rm -rf "$libs"
mv "$tmp" "$libs"
cp "$pom" "$stamp"  # the stamp is the pom it was made from: a version bump refetches
echo "$libs"

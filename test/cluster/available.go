package cluster

import (
	"fmt"
	"os"
)

// Available returns the binaries directory, or an error saying how to get
// the binaries, for suites that decide in TestMain (no *testing.T yet).
func Available() (string, error) {
	dir, err := DefaultBinDir()
	if err != nil {
		return "", err
	}
	if missing := MissingBinaries(dir); len(missing) > 0 {
		return "", fmt.Errorf("SKIP: cluster binaries %v missing from %s: run hack/cluster-bins.sh (set %s=1 to fail instead of skipping)", missing, dir, RequireEnv)
	}
	return dir, nil
}

// ExitCodeUnavailable is what a TestMain exits with when Available failed:
// 0 (skip) normally, 1 when MESHKEEPER_REQUIRE_CLUSTER=1.
func ExitCodeUnavailable() int {
	if os.Getenv(RequireEnv) == "1" {
		return 1
	}
	return 0
}

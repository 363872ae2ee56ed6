package plan

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func TestQueryWindow(t *testing.T) {
	cases := []struct {
		queries []string
		want    time.Duration
	}{
		{[]string{`sum(rate(istio_requests_total[5m]))`}, 5 * time.Minute},
		{[]string{`sum(rate(a[1m])) / sum(rate(b[1h30m]))`}, 90 * time.Minute},
		{[]string{`max_over_time(rate(a[2m])[30m:1m])`}, 30 * time.Minute},
		{[]string{`sum(rate(a[{{ .Interval }}]))`}, 30 * time.Second},
		{[]string{`sum(rate(a[{{.Interval}}]))`, `rate(b[2d])`}, 48 * time.Hour},
		{[]string{`up{job="ztunnel"}`}, 0},
	}
	for _, c := range cases {
		var slos []meshv1.SLO
		for _, q := range c.queries {
			slos = append(slos, meshv1.SLO{Name: "s", Query: q})
		}
		if got := QueryWindow(slos, 30*time.Second); got != c.want {
			t.Errorf("QueryWindow(%q) = %s, want %s", c.queries, got, c.want)
		}
	}
}

func TestFirstCheckWaitsForCleanWindow(t *testing.T) {
	g := gatesOn()
	if g.QueryWindow != 5*time.Minute || g.ScrapeInterval != time.Minute {
		t.Fatalf("fixture gates: window %s, scrape %s; want 5m and 1m", g.QueryWindow, g.ScrapeInterval)
	}
	if got := FirstCheckAfter(2*time.Minute, g); got != 8*time.Minute {
		t.Errorf("first check after %s, want bake 2m + window 5m + scrape 1m = 8m", got)
	}
}

// TestPlanIsPure: the planner and the rollout engine decide from what they
// are given; they must not reach for a cluster. controller-runtime's scheme
// package comes in through the API types only.
func TestPlanIsPure(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		switch {
		case dep == "sigs.k8s.io/controller-runtime/pkg/scheme":
		case strings.HasPrefix(dep, "k8s.io/client-go"), strings.HasPrefix(dep, "sigs.k8s.io/controller-runtime"):
			t.Errorf("internal/plan depends on %s: the planner must stay pure (gather facts in internal/controller)", dep)
		}
	}
}

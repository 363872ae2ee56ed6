package helm

import (
	"fmt"
	"strings"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
)

// Lint runs Helm's own chart linter (what `helm lint` runs) on the chart in
// dir with values, for RenderKubeVersion and namespace. It returns every
// finding at warning severity or above as one error; informational
// findings (a missing icon) are returned as notes.
func Lint(dir string, values map[string]any, namespace string) (notes []string, err error) {
	kv, err := common.ParseKubeVersion(RenderKubeVersion)
	if err != nil {
		return nil, err
	}
	res := lint.RunAll(dir, copyValues(values), namespace, lint.WithKubeVersion(kv))
	var problems []string
	for _, m := range res.Messages {
		if m.Severity >= support.WarningSev {
			problems = append(problems, m.Error())
		} else {
			notes = append(notes, m.Error())
		}
	}
	if len(problems) > 0 {
		return notes, fmt.Errorf("helm lint %s: %s", dir, strings.Join(problems, "; "))
	}
	return notes, nil
}

package plan

import (
	"testing"

	. "github.com/onsi/gomega"
	"k8s.io/utils/ptr"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// TestResolveTarget: which release a Mesh follows, and whether the upgrade
// policy (not spec.version) chose it, over the embedded catalog (1.26.4,
// 1.27.2, 1.27.3, 1.28.2).
func TestResolveTarget(t *testing.T) {
	auto := func(minor meshv1.UpgradePolicy) meshv1.UpgradeSpec { return meshv1.UpgradeSpec{Minor: minor} }
	manual := meshv1.UpgradeSpec{Automatic: ptr.To(false)}
	cases := []struct {
		name, version, installed string
		upgrade                  meshv1.UpgradeSpec
		want                     string
		automatic                bool
	}{
		{name: "fresh install of a minor: its newest patch", version: "1.27", want: "1.27.3"},
		{name: "a new patch of the installed minor is followed by itself", version: "1.27", installed: "1.27.2", want: "1.27.3", automatic: true},
		{name: "on the newest patch: nothing to do", version: "1.27", installed: "1.27.3", want: "1.27.3"},
		{name: "automatic: false stays on the installed patch", version: "1.27", installed: "1.27.2", upgrade: manual, want: "1.27.2"},
		{name: "a newer minor in spec.version is asked for, not automatic", version: "1.28", installed: "1.27.3", want: "1.28.2"},
		{name: "an exact version is that release", version: "1.27.2", installed: "1.27.2", want: "1.27.2"},
		{name: "minor: Manual (the default) stays on spec.version's minor", version: "1.26", installed: "1.26.4", want: "1.26.4"},
		{name: "minor: Automatic moves one minor only, not two", version: "1.26", installed: "1.26.4", upgrade: auto(meshv1.UpgradeAutomatic), want: "1.27.3", automatic: true},
		{name: "minor: Automatic takes the next minor from an older patch too", version: "1.27", installed: "1.27.2", upgrade: auto(meshv1.UpgradeAutomatic), want: "1.28.2", automatic: true},
		{name: "minor: Automatic past spec.version: the next minor again", version: "1.26", installed: "1.27.3", upgrade: auto(meshv1.UpgradeAutomatic), want: "1.28.2", automatic: true},
		{name: "minor: Automatic on the newest minor stays, never back to spec.version", version: "1.26", installed: "1.28.2", upgrade: auto(meshv1.UpgradeAutomatic), want: "1.28.2"},
		{name: "minor: Automatic with a newer spec.version: what the spec says", version: "1.28", installed: "1.26.4", upgrade: auto(meshv1.UpgradeAutomatic), want: "1.28.2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			spec := &meshv1.MeshSpec{Version: tc.version, Upgrade: tc.upgrade}
			got, err := ResolveTarget(spec, tc.installed, bundle.Default())
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(got.Version).To(Equal(tc.want))
			g.Expect(got.Automatic).To(Equal(tc.automatic))
		})
	}
}

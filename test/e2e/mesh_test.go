package e2e

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strings"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
)

var _ = Describe("The sample Mesh on a 3-node cluster", Ordered, func() {
	nsLabels := func(ctx context.Context, ns string) string {
		return kubectl(ctx, "get", "ns", ns, "-o", "jsonpath={.metadata.labels}")
	}

	It("becomes Ready and enrolls the selected namespaces", func(ctx SpecContext) {
		start := time.Now()
		kubectl(ctx, "apply", "-k", filepath.Join(root, "config", "samples"))
		kubectl(ctx, "wait", "--for=condition=Ready", "mesh/default", "--timeout=180s")
		GinkgoWriter.Printf("sample Mesh Ready %s after apply\n", time.Since(start).Round(time.Millisecond))

		for _, ns := range []string{"shop", "shop-staging"} {
			Expect(nsLabels(ctx, ns)).To(ContainSubstring(`"istio.io/dataplane-mode":"ambient"`), ns)
		}
		Expect(nsLabels(ctx, "legacy")).NotTo(ContainSubstring("istio.io/dataplane-mode"))

		table := kubectl(ctx, "get", "mesh")
		GinkgoWriter.Println(table)
		header, row := splitTable(table)
		Expect(header).To(Equal([]string{"NAME", "MODE", "INSTALLED", "TARGET", "READY", "STEP", "AGE"}))
		Expect(row[:5]).To(Equal([]string{"default", "Ambient", "1.28.2", "1.28.2", "True"}))
		Expect(kubectl(ctx, "get", "mesh", "default", "-o", "jsonpath={.status.dataplane.namespaces}")).To(Equal("2"))

		podNodes := func(component string) []string {
			return strings.Fields(kubectl(ctx, "get", "pods", "-n", "istio-system", "-l", "meshkeeper.dev/component="+component,
				"--field-selector=status.phase=Running", "-o", "jsonpath={.items[*].spec.nodeName}"))
		}
		Expect(podNodes("ztunnel")).To(ConsistOf("node-a", "node-b", "node-c"))
		Expect(podNodes("node-agent")).To(ConsistOf("node-b", "node-c"), "eBPF redirection where the kernel allows")
		Expect(podNodes("istio-cni")).To(ConsistOf("node-a"), "iptables fallback on the 5.4 node")
		Expect(kubectl(ctx, "get", "mesh", "default", "-o", `jsonpath={.status.conditions[?(@.type=="PreflightPassed")].message}`)).
			To(ContainSubstring("node-a: kernel 5.4.0 < 5.10.0 required (iptables)"))
	})

	It("labels a namespace that joins the selection and reverts one that leaves", func(ctx SpecContext) {
		kubectl(ctx, "label", "ns", "legacy", "mesh=on")
		Eventually(nsLabels).WithContext(ctx).WithArguments("legacy").WithTimeout(20 * time.Second).
			Should(ContainSubstring(`"istio.io/dataplane-mode":"ambient"`))

		kubectl(ctx, "label", "ns", "shop", "mesh-")
		Eventually(nsLabels).WithContext(ctx).WithArguments("shop").WithTimeout(20 * time.Second).
			ShouldNot(ContainSubstring("istio.io/dataplane-mode"))
		Eventually(func() string {
			return kubectl(ctx, "get", "mesh", "default", "-o", "jsonpath={.status.dataplane.namespaces}")
		}).WithTimeout(20 * time.Second).Should(Equal("2"))
	})

	It("refuses invalid Meshes with a message naming the field", func(ctx SpecContext) {
		files, err := filepath.Glob(filepath.Join(root, "test", "e2e", "testdata", "invalid", "*.yaml"))
		Expect(err).NotTo(HaveOccurred())
		Expect(files).NotTo(BeEmpty())
		for _, f := range files {
			want := expectation(f)
			_, stderr, err := kc.Kubectl(ctx, "apply", "-f", f)
			Expect(err).To(HaveOccurred(), "%s was accepted", filepath.Base(f))
			Expect(stderr).To(ContainSubstring(want), filepath.Base(f))
			GinkgoWriter.Printf("%s refused: %s\n", filepath.Base(f), strings.TrimSpace(stderr))
		}
		// Nothing was changed by the refused applies.
		Expect(kubectl(ctx, "get", "mesh", "-o", "name")).To(Equal("mesh.meshkeeper.dev/default\n"))
		kubectl(ctx, "wait", "--for=condition=Ready", "mesh/default", "--timeout=10s")
	})

	It("removes every release, managed object and label when the Mesh is deleted", func(ctx SpecContext) {
		kubectl(ctx, "delete", "mesh", "default", "--wait", "--timeout=180s")
		Expect(kubectl(ctx, "get", "deploy,ds,sts,cm,svc,sa,clusterrole,clusterrolebinding,mutatingwebhookconfiguration",
			"-A", "-l", "meshkeeper.dev/component", "-o", "name")).To(BeEmpty())
		Expect(kubectl(ctx, "get", "secrets", "-n", "meshkeeper-system", "-l", "owner=helm", "-o", "name")).To(BeEmpty(), "no Helm release left")
		Expect(kubectl(ctx, "get", "nodes", "-l", "meshkeeper.dev/redirection", "-o", "name")).To(BeEmpty())
		for _, ns := range []string{"shop", "shop-staging", "legacy"} {
			Expect(nsLabels(ctx, ns)).NotTo(ContainSubstring("istio.io/"), ns)
		}
		Expect(nsLabels(ctx, "legacy")).To(ContainSubstring(`"mesh":"on"`), "labels meshkeeper did not set stay")
	})
})

// expectation reads the "# expect: ..." line of a testdata file.
func expectation(path string) string {
	GinkgoHelper()
	f, err := os.Open(path)
	Expect(err).NotTo(HaveOccurred())
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if want, ok := strings.CutPrefix(sc.Text(), "# expect: "); ok {
			return want
		}
	}
	Fail(path + " has no '# expect: ' line")
	return ""
}

// splitTable returns the header and first row of kubectl's table output.
// Empty columns are kept by slicing at the header's column offsets.
func splitTable(out string) ([]string, []string) {
	GinkgoHelper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	Expect(len(lines)).To(BeNumerically(">=", 2))
	header := strings.Fields(lines[0])
	var starts []int
	for _, h := range header {
		starts = append(starts, strings.Index(lines[0], h))
	}
	var row []string
	for i, s := range starts {
		end := len(lines[1])
		if i+1 < len(starts) && starts[i+1] < end {
			end = starts[i+1]
		}
		if s >= len(lines[1]) {
			row = append(row, "")
			continue
		}
		row = append(row, strings.TrimSpace(lines[1][s:end]))
	}
	return header, row
}

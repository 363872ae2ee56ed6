// Package kernel parses and compares Linux kernel releases.
package kernel

import (
	"fmt"
	"strconv"
	"strings"
)

// Version is a parsed kernel release.
type Version struct{ Major, Minor, Patch int }

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// Less reports whether v is older than o.
func (v Version) Less(o Version) bool {
	if v.Major != o.Major {
		return v.Major < o.Major
	}
	if v.Minor != o.Minor {
		return v.Minor < o.Minor
	}
	return v.Patch < o.Patch
}

// Parse reads "6.1.0-28-amd64", "5.4.0" or "5.10" as a version.
func Parse(release string) (Version, error) {
	var v Version
	head, _, _ := strings.Cut(strings.TrimSpace(release), "-")
	parts := strings.SplitN(head, ".", 3)
	if len(parts) < 2 {
		return v, fmt.Errorf("kernel release %q: want major.minor[.patch]", release)
	}
	nums := make([]int, 3)
	for i, p := range parts {
		digits := strings.TrimRightFunc(p, func(r rune) bool { return r < '0' || r > '9' })
		n, err := strconv.Atoi(digits)
		if err != nil {
			return v, fmt.Errorf("kernel release %q: %w", release, err)
		}
		nums[i] = n
	}
	return Version{nums[0], nums[1], nums[2]}, nil
}

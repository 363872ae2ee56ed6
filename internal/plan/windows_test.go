package plan

import (
	"testing"
	"time"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

func window(cron string, d time.Duration) meshv1.MaintenanceWindow {
	return meshv1.MaintenanceWindow{Cron: cron, Duration: metav1.Duration{Duration: d}}
}

func utc(month time.Month, day, hour, minute int) time.Time {
	return time.Date(2026, month, day, hour, minute, 0, 0, time.UTC)
}

func TestWindowOpen(t *testing.T) {
	saturdayNight := []meshv1.MaintenanceWindow{window("0 2 * * 6", 4*time.Hour)} // 2026-03-07 is a Saturday
	cases := []struct {
		name    string
		windows []meshv1.MaintenanceWindow
		now     time.Time
		open    bool
		next    time.Time
	}{
		{name: "no windows: always open", windows: nil, now: utc(3, 10, 12, 0), open: true},
		{name: "inside", windows: saturdayNight, now: utc(3, 7, 3, 30), open: true, next: utc(3, 7, 6, 0)},
		{name: "at the opening minute", windows: saturdayNight, now: utc(3, 7, 2, 0), open: true, next: utc(3, 7, 6, 0)},
		{name: "at the closing time it is closed", windows: saturdayNight, now: utc(3, 7, 6, 0), open: false, next: utc(3, 14, 2, 0)},
		{name: "just before the opening", windows: saturdayNight, now: utc(3, 7, 1, 59), open: false, next: utc(3, 7, 2, 0)},
		{name: "outside, mid-week", windows: saturdayNight, now: utc(3, 10, 12, 0), open: false, next: utc(3, 14, 2, 0)},
		{name: "now in another zone is read in UTC", windows: saturdayNight,
			now: time.Date(2026, time.March, 7, 5, 30, 0, 0, time.FixedZone("EET", 2*3600)), open: true, next: utc(3, 7, 6, 0)},
		{name: "a window spanning midnight", windows: []meshv1.MaintenanceWindow{window("0 22 * * *", 4*time.Hour)},
			now: utc(3, 10, 1, 0), open: true, next: utc(3, 10, 2, 0)},
		{name: "the earliest of several next openings", windows: []meshv1.MaintenanceWindow{window("0 2 * * 6", time.Hour), window("30 4 * * 3", time.Hour)},
			now: utc(3, 10, 12, 0), open: false, next: utc(3, 11, 4, 30)},
		{name: "the latest end among open windows", windows: []meshv1.MaintenanceWindow{window("0 1 * * *", 2*time.Hour), window("0 2 * * *", 4*time.Hour), window("0 9 * * *", time.Hour)},
			now: utc(3, 10, 2, 30), open: true, next: utc(3, 10, 6, 0)},
		{name: "an hourly window lasting 90 minutes opened at the last activation", windows: []meshv1.MaintenanceWindow{window("0 * * * *", 90*time.Minute)},
			now: utc(3, 10, 12, 15), open: true, next: utc(3, 10, 13, 30)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			open, next, err := WindowOpen(tc.windows, tc.now)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(open).To(Equal(tc.open))
			g.Expect(next).To(Equal(tc.next))
		})
	}
}

func TestWindowOpenErrors(t *testing.T) {
	cases := []struct {
		name string
		w    meshv1.MaintenanceWindow
		want string
	}{
		{name: "four fields", w: window("0 2 * *", time.Hour), want: `spec.upgrade.windows[1].cron "0 2 * *": `},
		{name: "bad hour", w: window("0 25 * * 6", time.Hour), want: `e.g. "0 2 * * 6" (02:00 every Saturday)`},
		{name: "descriptor", w: window("@daily", time.Hour), want: `spec.upgrade.windows[1].cron "@daily"`},
		{name: "time zone", w: window("TZ=Europe/Berlin 0 2 * * 6", time.Hour), want: "windows are always in UTC and take no time zone"},
		{name: "never fires", w: window("0 0 30 2 *", time.Hour), want: "never fires"},
		{name: "zero duration", w: window("0 2 * * 6", 0), want: "spec.upgrade.windows[1].duration 0s: must be more than 0 and at most 168h"},
		{name: "longer than a week", w: window("0 2 * * 6", 200*time.Hour), want: "at most 168h"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := NewWithT(t)
			windows := []meshv1.MaintenanceWindow{window("0 2 * * 6", time.Hour), tc.w}
			_, _, err := WindowOpen(windows, utc(3, 10, 12, 0))
			g.Expect(err).To(MatchError(ContainSubstring(tc.want)))
		})
	}
}

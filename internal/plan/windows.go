package plan

import (
	"fmt"
	"strings"
	"time"

	"github.com/robfig/cron/v3"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// cronParser is the standard 5-field cron: minute hour day-of-month month
// day-of-week, no seconds, no descriptors (@daily), evaluated in UTC. The
// admission webhook parses windows with ParseCron too.
var cronParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow)

// maxWindow is the longest window admission accepts (one week).
const maxWindow = 168 * time.Hour

const cronHow = `use "minute hour day-of-month month day-of-week" in UTC, e.g. "0 2 * * 6" (02:00 every Saturday)`

// cronEpoch is a fixed time to ask whether a schedule ever fires, so the
// answer does not depend on the clock.
var cronEpoch = time.Date(2000, time.January, 1, 0, 0, 0, 0, time.UTC)

// CronNeverFires reports whether a schedule has no next run at all (e.g.
// "0 0 30 2 *": 30 February).
func CronNeverFires(s cron.Schedule) bool { return s.Next(cronEpoch).IsZero() }

// WindowOpen says whether a wave may start at now. A window opens at each of
// its cron times (UTC) and stays open for its duration, closing at the end
// (the interval is [start, start+duration)). No windows means always open.
//
// next is when the answer changes: while open, the latest end among the
// windows open now (a window opening later is a new window); while closed,
// the earliest next opening. It is zero when there are no windows.
func WindowOpen(windows []meshv1.MaintenanceWindow, now time.Time) (open bool, next time.Time, err error) {
	if len(windows) == 0 {
		return true, time.Time{}, nil
	}
	now = now.UTC()
	var closes, opens time.Time
	for i, w := range windows {
		sched, err := parseWindow(i, w)
		if err != nil {
			return false, time.Time{}, err
		}
		d := w.Duration.Duration
		if start, ok := lastStart(sched, now, d); ok {
			open = true
			if end := start.Add(d); end.After(closes) {
				closes = end
			}
			continue
		}
		if n := sched.Next(now); !n.IsZero() && (opens.IsZero() || n.Before(opens)) {
			opens = n
		}
	}
	if open {
		return true, closes, nil
	}
	return false, opens, nil
}

// lastStart is the latest activation in (now-d, now], if any: the window that
// opened then is still open.
func lastStart(sched cron.Schedule, now time.Time, d time.Duration) (time.Time, bool) {
	start := sched.Next(now.Add(-d))
	if start.IsZero() || start.After(now) {
		return time.Time{}, false
	}
	// Bounded: activations are at least a minute apart and d is at most a week.
	for {
		n := sched.Next(start)
		if n.IsZero() || n.After(now) {
			return start, true
		}
		start = n
	}
}

func parseWindow(i int, w meshv1.MaintenanceWindow) (cron.Schedule, error) {
	field := fmt.Sprintf("spec.upgrade.windows[%d]", i)
	if d := w.Duration.Duration; d <= 0 || d > maxWindow {
		return nil, fmt.Errorf("%s.duration %s: must be more than 0 and at most 168h (one week): how long the window stays open, e.g. 4h", field, d)
	}
	spec := strings.TrimSpace(w.Cron)
	if strings.HasPrefix(spec, "TZ=") || strings.HasPrefix(spec, "CRON_TZ=") {
		return nil, fmt.Errorf("%s.cron %q: windows are always in UTC and take no time zone; remove the TZ= prefix and convert the time to UTC", field, w.Cron)
	}
	sched, err := ParseCron(spec)
	if err != nil {
		return nil, fmt.Errorf("%s.cron %q: %v; %s", field, w.Cron, err, cronHow)
	}
	if CronNeverFires(sched) {
		return nil, fmt.Errorf("%s.cron %q: never fires (the day does not exist in the chosen months, e.g. 30 2 for 30 February); %s", field, w.Cron, cronHow)
	}
	return sched, nil
}

// ParseCron parses a 5-field cron and never panics.
func ParseCron(spec string) (s cron.Schedule, err error) {
	defer func() {
		if r := recover(); r != nil {
			s, err = nil, fmt.Errorf("cannot parse: %v", r)
		}
	}()
	return cronParser.Parse(spec)
}

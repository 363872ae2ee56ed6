package kernel

import "testing"

func TestParse(t *testing.T) {
	cases := map[string]Version{
		"6.1.0-28-amd64":    {6, 1, 0},
		"5.4.0-216-generic": {5, 4, 0},
		"5.10":              {5, 10, 0},
		"6.18.44-fc-v669":   {6, 18, 44},
		"4.19.0+":           {4, 19, 0},
	}
	for in, want := range cases {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "banana", "6", "x.y"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q): want an error", bad)
		}
	}
	if !(Version{5, 4, 0}).Less(Version{5, 10, 0}) || (Version{6, 1, 0}).Less(Version{5, 15, 0}) {
		t.Error("Less orders by major, minor, patch")
	}
}

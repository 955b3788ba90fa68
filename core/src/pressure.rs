//! Memory-pressure levels (the seed's `MemoryPressure`) with hysteresis, so a
//! callback fires on level changes only, not on every jitter around a threshold.

use crate::error::{Error, Result};

/// How full the device pools are.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MemoryPressure {
    /// Below the medium threshold.
    Low,
    /// At or above the medium threshold.
    Medium,
    /// At or above the high threshold.
    High,
    /// At or above the critical threshold.
    Critical,
}

/// Utilization thresholds of the levels (the seed's defaults: 0.6, 0.8, 0.95).
#[derive(Clone, Copy, PartialEq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PressureThresholds {
    /// Utilization at which pressure is `Medium`.
    pub medium: f32,
    /// Utilization at which pressure is `High`.
    pub high: f32,
    /// Utilization at which pressure is `Critical`.
    pub critical: f32,
}

impl Default for PressureThresholds {
    fn default() -> Self {
        Self {
            medium: 0.6,
            high: 0.8,
            critical: 0.95,
        }
    }
}

impl PressureThresholds {
    /// Checks `0 <= medium <= high <= critical <= 1` (NaN refused).
    pub fn validate(&self) -> Result<()> {
        let ok = 0.0 <= self.medium
            && self.medium <= self.high
            && self.high <= self.critical
            && self.critical <= 1.0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidThresholds)
        }
    }

    /// The level of a utilization, without hysteresis.
    pub fn level(&self, utilization: f32) -> MemoryPressure {
        if utilization >= self.critical {
            MemoryPressure::Critical
        } else if utilization >= self.high {
            MemoryPressure::High
        } else if utilization >= self.medium {
            MemoryPressure::Medium
        } else {
            MemoryPressure::Low
        }
    }

    fn threshold(&self, level: MemoryPressure) -> f32 {
        match level {
            MemoryPressure::Low => 0.0,
            MemoryPressure::Medium => self.medium,
            MemoryPressure::High => self.high,
            MemoryPressure::Critical => self.critical,
        }
    }
}

/// Tracks the level: it rises as soon as a threshold is reached and falls
/// only once utilization is `hysteresis` below the current level's threshold.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct PressureMonitor {
    thresholds: PressureThresholds,
    hysteresis: f32,
    level: MemoryPressure,
}

impl PressureMonitor {
    /// A monitor at `Low`. `hysteresis` in `[0, 1)`.
    pub fn new(thresholds: PressureThresholds, hysteresis: f32) -> Result<Self> {
        thresholds.validate()?;
        if !(0.0..1.0).contains(&hysteresis) {
            return Err(Error::InvalidThresholds);
        }
        Ok(Self {
            thresholds,
            hysteresis,
            level: MemoryPressure::Low,
        })
    }

    /// The current level.
    pub fn level(&self) -> MemoryPressure {
        self.level
    }

    /// Feeds a utilization; returns the new level if it changed.
    pub fn update(&mut self, utilization: f32) -> Option<MemoryPressure> {
        let raw = self.thresholds.level(utilization);
        let next = if raw > self.level {
            raw
        } else {
            // Fall level by level while below the current threshold minus hysteresis.
            let mut l = self.level;
            while l > raw && utilization < self.thresholds.threshold(l) - self.hysteresis {
                l = match l {
                    MemoryPressure::Critical => MemoryPressure::High,
                    MemoryPressure::High => MemoryPressure::Medium,
                    _ => MemoryPressure::Low,
                };
            }
            l
        };
        (next != self.level).then(|| {
            self.level = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_on_crossings_only_with_hysteresis() {
        let mut m = PressureMonitor::new(PressureThresholds::default(), 0.05).unwrap();
        let walk = [
            0.1, 0.59, 0.6, 0.7, 0.58, 0.56, 0.54, 0.81, 0.96, 0.94, 0.5, 0.0,
        ];
        let fired: heapless::Vec<_, 16> = walk.iter().filter_map(|&u| m.update(u)).collect();
        use MemoryPressure::*;
        assert_eq!(&fired[..], &[Medium, Low, High, Critical, Low]);
        assert!(
            PressureMonitor::new(
                PressureThresholds {
                    medium: 0.9,
                    high: 0.8,
                    critical: 1.0
                },
                0.0
            )
            .is_err()
        );
    }
}

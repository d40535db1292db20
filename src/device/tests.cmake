agorafs_add_test(device_test ${CMAKE_CURRENT_LIST_DIR}/device_test.cc
                 ${CMAKE_CURRENT_LIST_DIR}/crash_replay_test.cc)
agorafs_add_test(nbd_device_test ${CMAKE_CURRENT_LIST_DIR}/nbd_device_test.cc)
